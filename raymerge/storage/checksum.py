"""CRC-32 of output bytes, as the manifest and the journal record it (zlib's polynomial and values).

ISA-L's implementation (the `isal` package) is about nine times faster than zlib's here, which
spares a 2-core worker a tenth of its time; the values are the same either way.
"""

try:
    from isal.isal_zlib import crc32
except ImportError:  # a platform without an isal wheel: the same values, slower
    from zlib import crc32

__all__ = ["crc32"]
