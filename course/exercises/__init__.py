"""Checks for the exercises a student writes (7.1, 7.2, 7.4, and notebook 12's): each runs the
student's code without a traceback and returns a `Result` ("not attempted", "wrong" with
the first difference and a hint, or "right"). Used by notebooks 01, 02, 05 and 12.
"""

from .lora import GPT2_MEDIUM_LORA_PARAMETERS, TINY_GPT_CONFIG, check_lora
from .masking import check_instruction_masking
from .prompt_style import PHI3_ENTRIES, Phi3Style, check_phi3_style, phi3_style
from .results import NOT_ATTEMPTED, Choice, Result, choose, not_attempted, right, wrong

__all__ = [
    "GPT2_MEDIUM_LORA_PARAMETERS",
    "NOT_ATTEMPTED",
    "PHI3_ENTRIES",
    "TINY_GPT_CONFIG",
    "Choice",
    "Phi3Style",
    "Result",
    "check_instruction_masking",
    "check_lora",
    "check_phi3_style",
    "choose",
    "not_attempted",
    "phi3_style",
    "right",
    "wrong",
]
