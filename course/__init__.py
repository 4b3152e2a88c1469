"""The machinery beside the chapter's code (`helpers.py`): what makes the course fast and
unbreakable, one concern per module. README.md's "How the course is built" lists the
modules in layers; this package imports `helpers`, never the reverse.
"""
