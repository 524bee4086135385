"""Bearer tokens: the file format both the server (`--auth-token-file`) and `lossd health` read."""

from __future__ import annotations

__all__ = ["load_tokens"]


def load_tokens(token: str, token_file: str) -> list[str]:
    """The accepted tokens: `token`, plus one per non-empty, non-comment line of `token_file`.

    A ValueError names the setting when the file cannot be read or holds no token.
    """
    tokens = [token.strip()] if token.strip() else []
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as lines:
                found = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
        except OSError as exc:
            raise ValueError(f"auth_token_file {token_file!r} cannot be read: {exc.strerror}") from None
        if not found:
            raise ValueError(f"auth_token_file {token_file!r} holds no token")
        tokens += found
    return tokens
