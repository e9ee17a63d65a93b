"""Image uploads: parsing, validation, virus scanning and re-encoding (request path step 3).

Callers use ``webplatform.uploads.services``; see its docstring.
"""
