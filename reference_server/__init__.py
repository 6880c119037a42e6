"""A minimal, complete NBD server that follows the protocol specification to the letter."""

__version__ = "0.1.0"
