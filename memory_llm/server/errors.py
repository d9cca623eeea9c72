"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import re

_UNION_BRANCH = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|function-\w+\[.*\])$")  # pydantic's
# name of the member of a Union a value was tried as: not part of the parameter's name


class ApiError(Exception):
    """An error response: HTTP status, OpenAI error type and code."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(errors: list[dict]) -> ApiError:
    """One OpenAI-style error for FastAPI's validation errors: malformed JSON, a missing or invalid field."""
    e = errors[0] if errors else {"type": "invalid", "loc": (), "msg": "invalid request"}
    if e.get("type") == "json_invalid":
        return ApiError(400, f"The request body is not valid JSON ({e.get('ctx', {}).get('error', e['msg'])}).",
                        code="invalid_json")
    loc = [str(p) for p in e.get("loc", ()) if p != "body" and not _UNION_BRANCH.match(str(p))]
    param = ".".join(loc) or None
    if not loc and e.get("type") != "missing":
        return ApiError(400, "The request body must be a JSON object (Content-Type: application/json).",
                        code="invalid_json")
    if e.get("type") == "missing":
        if not loc:
            return ApiError(400, "The request body is missing (expected a JSON object).", code="missing_body")
        return ApiError(400, f"Missing required parameter: {param!r}.", code="missing_required_parameter",
                        param=param)
    message = f"Invalid parameter {param!r}: {e.get('msg')}." if param else f"Invalid request: {e.get('msg')}."
    return ApiError(400, message, code="invalid_value", param=param)
