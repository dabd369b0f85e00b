//! Compressing one 4 KiB page: which algorithm (`compress=`), and the
//! per-lane contexts that do it without allocating.

use std::fmt;
use std::str::FromStr;

use super::PAGE;
use crate::store::error::StoreError;

/// The zstd level `compress=zstd` means: the level zram's users and
/// nbd-vram's forks pick for swap, where a page is compressed on every
/// swap-out and every level above costs write speed for a few percent.
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;

/// Largest compressed page kept compressed: a page that does not shrink
/// to three quarters is stored raw, as zram keeps its "huge" pages, so a
/// read of it needs no decompression and its slot packs 16 to a block.
pub const MOST_COMPRESSED: usize = PAGE * 3 / 4;

/// How pages are stored (`compress=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Straight blocks, no page table: the store as it always was.
    #[default]
    Off,
    Lz4,
    /// zstd at a level from 1 to 19.
    Zstd(i32),
}

impl Compression {
    pub fn is_on(self) -> bool {
        self != Compression::Off
    }
}

impl FromStr for Compression {
    type Err = StoreError;

    /// `off`, `lz4`, `zstd` or `zstd:LEVEL`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let lower = text.to_ascii_lowercase();
        let bad = || {
            StoreError::Config(format!(
                "'{text}' is not a compression: expected off, lz4, zstd or zstd:LEVEL (1 to 19)"
            ))
        };
        match lower.split_once(':') {
            None => match lower.as_str() {
                "off" => Ok(Compression::Off),
                "lz4" => Ok(Compression::Lz4),
                "zstd" => Ok(Compression::Zstd(DEFAULT_ZSTD_LEVEL)),
                _ => Err(bad()),
            },
            Some(("zstd", level)) => match level.parse::<i32>() {
                Ok(level @ 1..=19) => Ok(Compression::Zstd(level)),
                _ => Err(bad()),
            },
            Some(_) => Err(bad()),
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Compression::Off => f.write_str("off"),
            Compression::Lz4 => f.write_str("lz4"),
            Compression::Zstd(level) => write!(f, "zstd:{level}"),
        }
    }
}

/// What one page turned into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Packed {
    /// Every 8-byte word of the page is this one (zeros included): kept
    /// in the page table alone.
    Same(u64),
    /// This many bytes of compressed page (at most [`MOST_COMPRESSED`]).
    Compressed(usize),
    /// It does not compress: keep the page as it is.
    Raw,
}

/// A compressor and decompressor with the buffer a page is compressed
/// into, made once per lane at open and reused for every page: nothing on
/// the I/O path allocates.
pub(super) struct Codec {
    engine: Engine,
    /// Room for the worst case of a page: lz4 refuses to start without it.
    out: Box<[u8]>,
}

enum Engine {
    Lz4(Box<lz4_flex::block::CompressTable>),
    Zstd {
        compress: zstd::bulk::Compressor<'static>,
        decompress: zstd::bulk::Decompressor<'static>,
    },
}

impl Codec {
    pub(super) fn new(compression: Compression) -> Result<Self, StoreError> {
        let failed = |err: std::io::Error| {
            StoreError::Config(format!("cannot make a {compression} context: {err}"))
        };
        let out = vec![0u8; lz4_flex::block::get_maximum_output_size(PAGE)].into_boxed_slice();
        match compression {
            Compression::Off => Err(StoreError::Config(
                "a codec needs a compression that is on".into(),
            )),
            Compression::Lz4 => Ok(Codec {
                engine: Engine::Lz4(Box::new(lz4_flex::block::CompressTable::small())),
                out,
            }),
            Compression::Zstd(level) => {
                let mut compress = zstd::bulk::Compressor::new(level).map_err(failed)?;
                // The page table knows each page's length and size: a frame
                // need not repeat it.
                compress
                    .set_parameter(zstd::zstd_safe::CParameter::ContentSizeFlag(false))
                    .map_err(failed)?;
                let decompress = zstd::bulk::Decompressor::new().map_err(failed)?;
                let mut codec = Codec {
                    engine: Engine::Zstd {
                        compress,
                        decompress,
                    },
                    out,
                };
                // zstd sizes a context's workspace at its first use: do
                // that here, not on the first swap-out.
                let mut page = [0x5au8; PAGE];
                page[0] = 0;
                if let Packed::Compressed(len) = codec.compress(&page) {
                    let packed = codec.packed(len).to_vec();
                    let mut back = [0u8; PAGE];
                    if !codec.decompress(&packed, &mut back) {
                        return Err(StoreError::Config(format!(
                            "{compression} does not bring a page back"
                        )));
                    }
                }
                Ok(codec)
            }
        }
    }

    /// Packs one page. When the answer is [`Packed::Compressed`],
    /// [`Codec::packed`] holds the bytes until the next page.
    pub(super) fn compress(&mut self, page: &[u8]) -> Packed {
        debug_assert_eq!(page.len(), PAGE);
        if let Some(word) = same_word(page) {
            return Packed::Same(word);
        }
        let out = &mut self.out;
        let result = match &mut self.engine {
            Engine::Lz4(table) => lz4_flex::block::compress_into_with_table(page, out, table).ok(),
            Engine::Zstd { compress, .. } => compress
                .compress_to_buffer(page, &mut out[..MOST_COMPRESSED])
                .ok(),
        };
        match result {
            Some(len) if len > 0 && len <= MOST_COMPRESSED => Packed::Compressed(len),
            _ => Packed::Raw,
        }
    }

    /// The `len` bytes the last [`Codec::compress`] made.
    pub(super) fn packed(&self, len: usize) -> &[u8] {
        &self.out[..len]
    }

    /// Unpacks `packed` into `page`. False when it does not come back as
    /// a whole page (bytes that changed in VRAM).
    #[must_use]
    pub(super) fn decompress(&mut self, packed: &[u8], page: &mut [u8]) -> bool {
        let got = match &mut self.engine {
            Engine::Lz4(_) => lz4_flex::block::decompress_into(packed, page).ok(),
            Engine::Zstd { decompress, .. } => decompress.decompress_to_buffer(packed, page).ok(),
        };
        got == Some(PAGE)
    }
}

/// The word every 8 bytes of `page` repeat, if they all do.
pub(super) fn same_word(page: &[u8]) -> Option<u64> {
    let mut words = page
        .chunks_exact(8)
        .map(|w| u64::from_ne_bytes(w.try_into().unwrap_or_default()));
    let first = words.next()?;
    words.all(|w| w == first).then_some(first)
}

/// Fills `page` with `word`.
pub(super) fn fill_word(page: &mut [u8], word: u64) {
    for chunk in page.chunks_exact_mut(8) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_page(seed: u8) -> Vec<u8> {
        let words = ["swap ", "page ", "vram ", "block ", "chunk "];
        let mut page = Vec::with_capacity(PAGE);
        let mut i = seed as usize;
        while page.len() < PAGE {
            page.extend_from_slice(words[i % words.len()].as_bytes());
            i = i.wrapping_mul(7).wrapping_add(3);
        }
        page.truncate(PAGE);
        page
    }

    #[test]
    fn compressions_parse_and_print_back() {
        for (text, want) in [
            ("off", Compression::Off),
            ("lz4", Compression::Lz4),
            ("LZ4", Compression::Lz4),
            ("zstd", Compression::Zstd(1)),
            ("zstd:3", Compression::Zstd(3)),
            ("zstd:19", Compression::Zstd(19)),
        ] {
            let got: Compression = text.parse().unwrap();
            assert_eq!(got, want, "{text}");
            assert_eq!(got.to_string().parse::<Compression>().unwrap(), want);
        }
        for bad in ["", "gzip", "zstd:0", "zstd:20", "zstd:x", "lz4:1", "zstd:"] {
            let err = bad.parse::<Compression>().unwrap_err().to_string();
            assert!(err.contains("expected off, lz4, zstd"), "{bad}: {err}");
        }
    }

    #[test]
    fn every_codec_brings_every_kind_of_page_back() {
        let mut random = vec![0u8; PAGE];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for byte in &mut random {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *byte = x as u8;
        }
        for compression in [Compression::Lz4, Compression::Zstd(1), Compression::Zstd(9)] {
            let mut codec = Codec::new(compression).unwrap();
            let mut back = vec![0u8; PAGE];
            let text = text_page(1);
            match codec.compress(&text) {
                Packed::Compressed(len) => {
                    assert!(len < PAGE / 2, "{compression}: {len}");
                    let out = codec.packed(len).to_vec();
                    assert!(codec.decompress(&out, &mut back));
                    assert_eq!(back, text);
                    assert!(
                        !codec.decompress(&out[..len / 2], &mut back),
                        "{compression}"
                    );
                }
                other => panic!("{compression}: text packed as {other:?}"),
            }
            assert_eq!(codec.compress(&random), Packed::Raw);
            assert_eq!(codec.compress(&[0u8; PAGE]), Packed::Same(0));
            let mut same = vec![0u8; PAGE];
            fill_word(&mut same, 0x0102_0304_0506_0708);
            assert_eq!(codec.compress(&same), Packed::Same(0x0102_0304_0506_0708));
        }
    }

    #[test]
    fn a_page_with_one_different_word_is_not_same_filled() {
        let mut page = vec![0u8; PAGE];
        assert_eq!(same_word(&page), Some(0));
        page[PAGE - 1] = 1;
        assert_eq!(same_word(&page), None);
    }
}
