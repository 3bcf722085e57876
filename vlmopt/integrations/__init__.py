"""Bridges from vlmopt's models and artifacts to other tools' harnesses (``lmms_eval``)."""
