"""Speed: timing compiled models (``bench``) and roofline estimates per chip (``costmodel``)."""
