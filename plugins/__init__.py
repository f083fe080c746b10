"""quantfmt's built-in formats, one module per format (installed as `quantfmt_formats`).

Every module here is a plugin, loaded through the same `register_formats` hook as
third-party ones; modules whose name starts with "_" are shared helpers, not plugins.
"""
