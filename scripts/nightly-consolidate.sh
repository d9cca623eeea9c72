#!/usr/bin/env bash
# Nightly consolidation, for cron or a systemd timer. Exit codes (from `mllm consolidate`):
#   0 promoted / nothing new     3 candidate rejected by the gate or training diverged (current adapter kept)
#   4 time budget reached (partial work kept; the next night continues)
#   75 another consolidation is running (EX_TEMPFAIL: retry later)    1 error
#
# cron (every night at 02:30, at most 90 minutes):
#   30 2 * * *  MLLM_HOME=$HOME/.local/share/memory_llm /path/to/checkout/scripts/nightly-consolidate.sh >> $HOME/mllm-nightly.log 2>&1
#
# systemd (user units):
#   ~/.config/systemd/user/mllm-consolidate.service
#     [Service]
#     Type=oneshot
#     ExecStart=/path/to/checkout/scripts/nightly-consolidate.sh
#     SuccessExitStatus=3 4 75
#   ~/.config/systemd/user/mllm-consolidate.timer
#     [Timer]
#     OnCalendar=*-*-* 02:30
#     Persistent=true
#     [Install]
#     WantedBy=timers.target
#   systemctl --user enable --now mllm-consolidate.timer
set -uo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
mllm="${MLLM_BIN:-$here/.venv/bin/mllm}"
echo "[$(date -Is)] consolidate start"
"$mllm" consolidate --max-minutes "${MLLM_NIGHTLY_MINUTES:-90}" --json
code=$?
echo "[$(date -Is)] consolidate exit $code"
exit $code
