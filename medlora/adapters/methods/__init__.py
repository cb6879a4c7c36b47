"""Built-in adapter methods; importing this package registers them."""

from . import conv_lora, cp_lora, dora, lora, lora_c, salt  # noqa: F401
