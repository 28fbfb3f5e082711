"""The one exception type that main turns into a single clear line and a non-zero exit."""


class UserError(Exception):
    """Bad input from the user: the message names the problem and the fix."""


def need(ok: bool, message: str) -> None:
    """A config check: UserError(message) unless `ok`."""
    if not ok:
        raise UserError(message)
