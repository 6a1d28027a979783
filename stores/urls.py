"""The one credential scrubber. Every path or URL that is stored (store attributes, cfg.json,
checkpoint/state.json, results.json), logged (wandb) or printed (error lines, summaries) goes
through scrub() or scrub_text() first.

What goes: user:password@ in the netloc (and a bare user@, which for http(s) and most object
stores is a token: https://hf_xxx@host; a password holding a '/': everything up to the last '@'), and the values of query parameters that carry secrets
(signed URLs, SAS tokens, access tokens), which are masked as `***` with the key kept so the URL
still says what it was. What stays: Azure's `container@account` (abfs://, az://, wasb://), which
names a place, not a secret; local paths, which are returned unchanged.
"""
from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

MASK = "***"

# Azure object-store URLs put the container where other URLs put a user name.
_AZURE_SCHEMES = {"abfs", "abfss", "az", "adl", "wasb", "wasbs"}

# Query keys (lower case) whose values are secrets, or (SAS) let anyone holding them sign requests.
_SECRET_KEYS = {
    "token", "access_token", "id_token", "refresh_token", "auth", "authorization", "key", "api_key",
    "apikey", "password", "passwd", "pass", "pwd", "secret", "client_secret", "sig", "signature",
    "credential", "credentials", "session_token", "security_token",
    "x-amz-signature", "x-amz-credential", "x-amz-security-token",
    "x-goog-signature", "x-goog-credential",
    # Azure SAS: sig is the signature; the others scope it and together form the token
    "se", "sp", "sv", "st", "sr", "ss", "srt", "spr", "si", "skoid", "sktid", "skt", "ske", "sks", "skv",
}
# ...and any key that merely contains one of these words
_SECRET_WORDS = ("token", "secret", "passw", "signature", "credential", "apikey", "api_key", "private")

_URL_IN_TEXT = re.compile(r"\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]+")


def _secret_key(key: str) -> bool:
    k = key.lower()
    return k in _SECRET_KEYS or any(w in k for w in _SECRET_WORDS)


def _mask_params(text: str) -> str:
    """k=v&k2=v2 with the values of secret keys masked (order, separators and other values kept)."""
    parts = re.split(r"([&;])", text)
    for i in range(0, len(parts), 2):
        key, eq, value = parts[i].partition("=")
        if eq and value and _secret_key(unquote(key)):
            parts[i] = f"{key}={MASK}"
    return "".join(parts)


def _netloc(scheme: str, netloc: str) -> str:
    if "@" not in netloc:
        return netloc
    userinfo, _, host = netloc.rpartition("@")
    if scheme.lower() in _AZURE_SCHEMES:
        container = userinfo.split(":", 1)[0]    # container@account names a place; a :part is not
        return f"{container}@{host}" if container else host
    return host


def _place(url: str) -> str:
    """What follows :// up to the query or fragment: user info (if any), host and path."""
    return re.split(r"[?#]", url.partition("://")[2], maxsplit=1)[0]


def _userinfo(place: str) -> str:
    """The user info of a URL's place (what _place returns), '' when none. Normally what precedes
    an '@' in the netloc; but a password may hold a '/' (AWS secret keys do), which ends the netloc
    early: a first segment holding a ':' that is not a port (host:8080), with an '@' later, is a
    user:password running up to the last '@'. An '@' in the path alone (s3://bucket/team@lab/x)
    is not user info: masking it would change the URL recorded for a resume."""
    first = place.split("/", 1)[0]
    user, rest = first.rpartition("@")[0], place[len(first):]
    port = first.partition(":")[2]
    if "@" in rest and (":" in user or (not user and port and not port.isdigit())):
        return place.rpartition("@")[0]
    return user


def scrub(path_or_url):
    """The path or URL with every credential removed or masked; local paths (and None) unchanged."""
    if path_or_url is None:
        return None
    text = str(path_or_url)
    if "://" not in text:
        return text
    hidden, place = "", _place(text)
    userinfo = _userinfo(place)
    if userinfo and "/" in userinfo:
        # a user:password holding a '/' (AWS secret keys may): urlsplit would end the netloc at
        # that '/' and keep the rest as a path, so everything up to the last '@' goes, marked. A
        # path that merely holds an '@' loses its start too: over-scrubbing is safe, a leak is not.
        hidden = f"{MASK}@"
        scheme = text.partition("://")[0]
        text = f"{scheme}://{place.rpartition('@')[2]}{text[len(scheme) + 3 + len(place):]}"
    try:
        parts = urlsplit(text)
    except ValueError:   # e.g. an unbalanced [ in the netloc: drop everything between :// and the last @
        return re.sub(r"://[^?#]*@", "://" + hidden, text)
    if not parts.scheme or not text.startswith(parts.scheme + "://"):
        return re.sub(r"://[^?#]*@", "://" + hidden, text)
    out = f"{parts.scheme}://{hidden}{_netloc(parts.scheme, parts.netloc)}{parts.path}"
    if "?" in text.split("#", 1)[0]:
        out += "?" + _mask_params(parts.query)
    if "#" in text:
        out += "#" + _mask_params(parts.fragment)
    return out


def scrub_text(text):
    """Free text (an error message, a JSON document) with every URL in it scrubbed."""
    if text is None:
        return None
    return _URL_IN_TEXT.sub(lambda m: scrub(m.group(0)), str(text))


def scrub_tree(value):
    """A JSON-like value with every string in it passed through scrub_text (dicts, lists, tuples)."""
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, dict):
        return {k: scrub_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(scrub_tree(v) for v in value)
    return value


def secrets_in(text) -> set[str]:
    """The credential strings inside the URLs of `text` (e.g. a command line): user:password and
    each part of it, the values of secret query parameters, raw and unquoted. A library error
    that quotes a URL's netloc without its scheme (botocore: `Invalid bucket name
    "KEY:SECRET@bucket"`) escapes scrub_text; redact() with these catches it."""
    found = set()
    for m in _URL_IN_TEXT.finditer(str(text or "")):
        url = m.group(0)
        scheme, _, rest = url.partition("://")
        # up to the last '@' before the query, not the first '/': a secret may hold a '/'
        userinfo = _userinfo(_place(url))
        if scheme.lower() in _AZURE_SCHEMES:     # container@account: only a :key is a secret
            userinfo = userinfo.partition(":")[2]
            secrets = [userinfo]
        else:
            secrets = [userinfo, *userinfo.split(":", 1)]
        for s in secrets:
            # and each '/'-separated piece: a library quoting the netloc ends it at the first '/'
            found.update({s, *s.split("/")})
        query = "&".join(p.split("#", 1)[0] for p in (rest.split("?", 1)[1:] + rest.split("#", 1)[1:]))
        for part in re.split(r"[&;]", query):
            key, eq, value = part.partition("=")
            if eq and value and _secret_key(unquote(key)):
                found.update({value, unquote(value)})
    return {s for s in found if len(s) >= 3}   # a 1-2 character "secret" would mask half the line


def redact(text, secrets) -> str:
    """scrub_text(text), then every occurrence of each secret (longest first) masked."""
    out = scrub_text(text) or ""
    for s in sorted(secrets, key=len, reverse=True):
        out = out.replace(s, MASK)
    return out
