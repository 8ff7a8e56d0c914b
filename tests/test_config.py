import os

import pytest

from vncgate import config


def write(tmp_path, text, name="vncgate.ini"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_without_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(config.ENV_VAR, raising=False)
    loaded = config.load()
    assert (loaded.listen, loaded.port, loaded.token_ttl, loaded.idle_timeout) == ("127.0.0.1", 6080, 300, 600)
    assert loaded.base_url == "http://127.0.0.1:6080"
    assert loaded.database == os.path.join(str(tmp_path), "vncgate.db")
    assert loaded.source == ""


def test_the_shipped_ini_equals_the_defaults():
    shipped = config.load(os.path.join(os.path.dirname(__file__), "..", "vncgate.ini"))
    for key, (_parse, default) in config.SCHEMA.items():
        if key not in ("database", "web_root"):
            assert getattr(shipped, key) == default, key


def test_env_var_names_the_file_and_database_is_relative_to_it(tmp_path, monkeypatch):
    (tmp_path / "etc").mkdir()
    path = write(tmp_path / "etc", "[gateway]\ndatabase = state/tokens.db\nport = 7000\n")
    monkeypatch.setenv(config.ENV_VAR, path)
    monkeypatch.chdir("/")
    loaded = config.load()
    assert loaded.port == 7000
    assert loaded.database == str(tmp_path / "etc" / "state" / "tokens.db")
    assert loaded.base_url == "http://127.0.0.1:7000"


def test_public_url_and_origins(tmp_path):
    loaded = config.load(write(tmp_path, "[gateway]\npublic_url = https://Console.Example:8443/\n"
                                         "allowed_origins = https://a.example, https://b.example\n"))
    assert loaded.base_url == "https://Console.Example:8443"
    assert loaded.public_origin == "https://console.example:8443"
    assert loaded.allowed_origins == ("https://a.example", "https://b.example")


@pytest.mark.parametrize("text, message", [
    ("[gateway]\nport = abc\n", "[gateway] port: must be a port number, got 'abc'"),
    ("[gateway]\nport = 70000\n", "[gateway] port: must be from 1 to 65535, got '70000'"),
    ("[gateway]\ntoken_ttl = -5\n", "[gateway] token_ttl: must be greater than 0, got '-5'"),
    ("[gateway]\nmax_connections = many\n", "[gateway] max_connections: must be a whole number"),
    ("[gateway]\ncolour = blue\n", "[gateway] colour: unknown key"),
    ("[gateway]\npublic_url = console.example\n", "public_url: must be an http:// or https:// URL"),
    ("[gateway]\ncert = a.pem\n", "cert and key must be set together"),
    ("[other]\nport = 1\n", "unknown section [other]"),
    ("port = 6080\n", "malformed config file"),
    ("[gateway]\n[gateway]\n", "malformed config file"),
])
def test_bad_files_name_file_key_and_problem(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(config.ConfigError) as error:
        config.load(path)
    assert str(error.value).startswith(path + ": ")
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_explicit_file(tmp_path):
    with pytest.raises(config.ConfigError, match="cannot read config file"):
        config.load(str(tmp_path / "absent.ini"))


def test_non_utf8_file(tmp_path):
    path = tmp_path / "bad.ini"
    path.write_bytes(b"[gateway]\nlisten = \xff\xfe\n")
    with pytest.raises(config.ConfigError, match="not UTF-8"):
        config.load(str(path))
