"""Exception classes that numlab raises on bad input."""


class NumlabError(Exception):
    """Base class of numlab's own errors."""


class GGUFError(NumlabError, ValueError):
    """A GGUF file numlab cannot use; the message names the file, the field and what was wrong."""
