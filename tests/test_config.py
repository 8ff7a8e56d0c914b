import os

import pytest

from vncgate import config, store


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
    assert set(config.PARSERS) == set(config.DEFAULTS)  # every key has a parser and a default
    for key, default in config.DEFAULTS.items():
        if key not in ("database", "web_root", "console_log_dir", "record_dir"):  # paths: resolved against the file
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
    ("[gateway]\ninput_idle_timeout = -1\n", "[gateway] input_idle_timeout: must be 0 or more, got '-1'"),
    ("[gateway]\ninput_idle_timeout = soon\n", "[gateway] input_idle_timeout: must be a number"),
    ("[gateway]\npaste_max_chars = 0\n", "[gateway] paste_max_chars: must be greater than 0"),
    ("[gateway]\nresume_grace = 0\n", "[gateway] resume_grace: must be greater than 0"),
    ("[gateway]\npublic_url = console.example\n", "public_url: must be an http:// or https:// URL"),
    ("[gateway]\ncert = a.pem\n", "cert and key must be set together"),
    ("[other]\nport = 1\n", "unknown section [other]"),
    ("port = 6080\n", "malformed config file"),
    ("[gateway]\n[gateway]\n", "malformed config file"),
    ("[gateway]\ndatabase = postgres://h/db\n", "database: must be a file path or one of redis://"),
    ("[gateway]\ndatabase = redis://h:99999/0\n", "database: must have ports from 1 to 65535"),
    ("[gateway]\ndatabase = redis://h:6379/zero\n", "database: must end in a database number"),
    ("[gateway]\ndatabase = redis://a:1,b:2/0\n", "database: must name one HOST:PORT"),
    ("[gateway]\ndatabase = redis+sentinel://h:26379\n", "database: must name the Sentinel service"),
    ("[gateway]\ndatabase = redis://:s3cret@:6379/0\n", "database: must name a host, as in"),
    ("[gateway]\nkey_prefix = two words\n", "key_prefix: must be a non-empty word without spaces"),
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


def test_bad_redis_url_never_shows_its_password(tmp_path):
    with pytest.raises(config.ConfigError) as error:
        config.load(write(tmp_path, "[gateway]\ndatabase = redis://:s3cret@h:0/0\n"))
    assert "s3cret" not in str(error.value) and "redis://h:0/0" in str(error.value)


@pytest.mark.parametrize("url, hosts, service, db", [
    ("redis://127.0.0.1:6390/2", (("127.0.0.1", 6390),), "", 2),
    ("rediss://:pw@cache.example/0", (("cache.example", 6379),), "", 0),
    ("redis://[::1]:7000", (("::1", 7000),), "", 0),
    ("redis+sentinel://s1:26379,s2,[::1]:26380/gw/3", (("s1", 26379), ("s2", 26379), ("::1", 26380)), "gw", 3),
])
def test_redis_urls_are_kept_as_they_are(tmp_path, url, hosts, service, db):
    loaded = config.load(write(tmp_path, f"[gateway]\ndatabase = {url}\nkey_prefix = site-a:\n"))
    assert loaded.database == url and loaded.key_prefix == "site-a:"  # not made a path
    target = store.RedisTarget.parse(loaded.database)
    assert (target.hosts, target.service, target.db) == (hosts, service, db)
    assert "pw" not in target.redacted
def test_policy_keys(tmp_path):
    loaded = config.load(write(tmp_path, "[gateway]\nresume_grace = 5\npaste_max_chars = 100\n"
                                         "input_idle_timeout = 0\n"))
    assert (loaded.resume_grace, loaded.paste_max_chars, loaded.input_idle_timeout) == (5.0, 100, 0.0)
    assert config.load(write(tmp_path, "[gateway]\ninput_idle_timeout = 90\n")).input_idle_timeout == 90.0


def test_sentinel_urls_take_the_sentinels_password_and_tls():
    target = store.RedisTarget.parse("rediss+sentinel://:pw@s1,s2:26380/gw/1?sentinel_password=spw&ssl_ca_certs=/ca.pem")
    assert target.sentinel and target.tls and target.service == "gw" and target.db == 1
    assert (target.option("sentinel_password"), target.option("ssl_ca_certs")) == ("spw", "/ca.pem")
    assert "spw" not in target.redacted and "pw" not in target.redacted
    assert target.redacted == "rediss+sentinel://s1:26379,s2:26380/gw/1"
    with pytest.raises(ValueError) as refused:
        store.RedisTarget.parse("redis+sentinel://s1/gw/0?password=x")
    assert str(refused.value) == "may set only sentinel_password, ssl_ca_certs after '?', not password"
