"""The one exception type a user can fix: the CLI prints its message as one line and exits 2."""


class UserError(Exception):
    """Bad input (unknown name, missing file, bad config). The message names the problem and the fix."""


def unknown_name(kind: str, name: str, valid) -> UserError:
    """`Unknown model 'resnet19'; valid names: ...` -- the same wording for every registry."""
    return UserError(f"Unknown {kind} {name!r}; valid names: {', '.join(sorted(valid))}")
