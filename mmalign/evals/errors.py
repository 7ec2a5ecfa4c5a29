"""The error of an evaluation that cannot run as asked where no narrower error fits (a bad setting is a
`mmalign.core.config.ConfigError`, a bad data row a `mmalign.datasets.records.DataError`). The `mmalign` command
prints its message and exits."""


class EvalError(Exception):
    """Nothing usable to evaluate, a model that does not load, or scores that cannot be computed."""
