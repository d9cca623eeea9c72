import pytest

from memory_llm import InputError, Settings


def test_defaults_come_from_env_home(tmp_path):
    s = Settings.load()
    assert s.home == tmp_path / "home"
    assert s.model == "smollm2" and s.top_k == 4


def test_save_load_round_trip(tmp_path):
    s = Settings.load(top_k=7, model="some/model", dedup_threshold=0.9)
    s.save()
    again = Settings.load()
    assert (again.top_k, again.model, again.dedup_threshold) == (7, "some/model", 0.9)
    assert again.chunk_tokens == Settings.load(tmp_path / "other").chunk_tokens


def test_precedence_file_then_env_then_override(monkeypatch):
    Settings.load(top_k=3).save()
    assert Settings.load().top_k == 3
    monkeypatch.setenv("MLLM_TOP_K", "5")
    assert Settings.load().top_k == 5
    assert Settings.load(top_k=9).top_k == 9


@pytest.mark.parametrize("name,value", [("top_k", 0), ("chunk_overlap", 500), ("dedup_threshold", 1.5),
                                        ("device", "tpu"), ("dtype", "int3")])
def test_validation_names_field_and_value(name, value):
    with pytest.raises(InputError, match=name):
        Settings.load(**{name: value})


def test_bad_config_file_is_a_clear_error(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text("top_k = [unclosed")
    with pytest.raises(InputError, match="not valid TOML"):
        Settings.load()
    (home / "config.toml").write_text("no_such_setting = 1\n")
    with pytest.raises(InputError, match="unknown setting 'no_such_setting'"):
        Settings.load()
    (home / "config.toml").write_text('top_k = "many"\n')
    with pytest.raises(InputError, match="top_k"):
        Settings.load()
