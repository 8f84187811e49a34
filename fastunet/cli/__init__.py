"""The ``fastunet`` command line (``python -m fastunet.cli`` or the ``fastunet`` script)."""
