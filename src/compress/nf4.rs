//! NF4 (bitsandbytes) codec. Being written.
