"""Grids of runs behind ``fedprompt table`` and ``fedprompt study``: resume, tables, plots."""
