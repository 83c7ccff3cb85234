"""Chat templates shipped with the package (Jinja, as transformers' `chat_template.jinja`)."""

from importlib import resources


def chat_template(name: str) -> str:
    """`qwen3_vl` (Qwen3 thinking + vision placeholders) or `qwen2_5_vl`."""
    return resources.files(__package__).joinpath(f"{name}.jinja").read_text()
