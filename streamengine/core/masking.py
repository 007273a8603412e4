"""Secrets out of what is shown: the passwords of a DSN masked, known secret values replaced (pure: no I/O).

Used wherever a configured secret could reach a log line, an error message or an HTTP body: the
settings output, PostgreSQL and S3 error details, the admin API's health checks, the log formatter.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import quote, quote_plus, unquote, unquote_plus, urlsplit, urlunsplit

from pydantic import BaseModel, SecretStr

MASK = "***"
MIN_SECRET_LENGTH = 4
"""Shorter values are not replaced in free text (they would garble it and hide little)."""
_PASSWORD_PARAMETERS = frozenset({"password", "sslpassword"})


def _split_query(query: str) -> list[tuple[str, str, str]]:
    """(raw key, raw value, separator) per ``key=value`` part, as written."""
    parts = []
    for item in query.split("&") if query else []:
        key, sep, value = item.partition("=")
        parts.append((key, value, sep))
    return parts


def _is_password(raw_key: str) -> bool:
    return unquote_plus(raw_key).lower() in _PASSWORD_PARAMETERS


def dsn_passwords(url: str) -> list[str]:
    """The passwords a DSN holds (its user info and ``password=`` parameters), as written and decoded."""
    parts = urlsplit(url)
    found: list[str] = []
    userinfo, at, _ = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        written = userinfo.partition(":")[2]
        found += [written, unquote(written)]
    for key, value, _ in _split_query(parts.query):
        if value and _is_password(key):
            found += [value, unquote_plus(value)]
    return [p for p in dict.fromkeys(found) if p]


def mask_dsn(url: str) -> str:
    """``url`` with the password of its user info and of its ``password=`` parameters shown as ***."""
    parts = urlsplit(url)
    netloc = parts.netloc
    userinfo, at, host = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:{MASK}@{host}"
    query = "&".join(
        f"{key}{sep}{MASK if value and _is_password(key) else value}" for key, value, sep in _split_query(parts.query)
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def target(url: str) -> str:
    """``host:port/database`` of a DSN: no user, password or parameters (never raises)."""
    parts = urlsplit(url)
    hosts = parts.netloc.rpartition("@")[2] or "localhost"
    if ":" not in hosts.rsplit("]", 1)[-1]:
        hosts += ":5432"
    return f"{hosts}{parts.path}"


def secret_forms(values: Iterable[str]) -> list[str]:
    """Each value as written, percent-encoded and form-encoded; longest first, short ones left out."""
    forms = {
        form
        for value in values
        if len(value) >= MIN_SECRET_LENGTH
        for form in (value, quote(value, safe=""), quote_plus(value))
    }
    return sorted(forms, key=len, reverse=True)


def redact(text: str, values: Iterable[str]) -> str:
    """``text`` with every secret value (as written, percent- or form-encoded) replaced by ***."""
    for form in secret_forms(values):
        text = text.replace(form, MASK)
    return text


def settings_secrets(settings: BaseModel) -> list[str]:
    """Every secret value of a settings model, nested sections included (of a DSN: its passwords only)."""
    found: list[str] = []
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, BaseModel):
            found += settings_secrets(value)
        elif isinstance(value, SecretStr):
            text = value.get_secret_value()
            found += dsn_passwords(text) if "://" in text else [text]
    return found
