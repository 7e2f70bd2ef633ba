"""The choices a user can name: modalities, scales, character sets, transfer syntaxes.

Plain tuples, no imports, so `pacs-harness generate --help` (and the command list of
`pacs-harness --help`) shows them without loading pydicom, numpy or faker. The modules that
implement each choice import their names from here.
"""

SCALES = ("tiny", "small", "realistic")
MODALITIES = ("CT", "MR", "CR", "DX", "US", "NM", "PT", "MG", "XA", "SC", "SR", "DOC")

# Specific Character Set values, PS3.3 C.12.1.1.2 ("default" = none, ISO-IR 6)
DEFAULT = "default"
LATIN1 = "ISO_IR 100"
UTF8 = "ISO_IR 192"
JAPANESE = "ISO 2022 IR 87"
KOREAN = "ISO 2022 IR 149"
CHARSET_NAMES = (DEFAULT, LATIN1, UTF8, JAPANESE, KOREAN)

SYNTAX_NAMES = (
    "implicit", "explicit", "deflated", "rle", "jpeg-lossless", "j2k-lossless", "j2k-lossy",
)
