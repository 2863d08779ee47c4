"""Prompt construction for the frozen text tower."""

from fedprompt.text.context_splicing import PromptTextEncoder

__all__ = ["PromptTextEncoder"]
