//! Packers and unpackers for weight codes (docs/numerics.md N11) and KV4 codes (N11b).
//!
//! One convention everywhere: codes of `B` bits are little-endian within a byte, code `j` of a
//! byte at bits `[B*(j mod (8/B)), B*(j mod (8/B)) + B)`. Rows (weights), channels (KV4 keys)
//! and tokens (KV4 values) each start on a byte boundary.

use std::fmt;

/// The storage format of a weight tensor (N7, N8). Ternary is 2-bit with a fixed zero point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    W2,
    W4,
    W8,
    /// BitNet b1.58: codes {0, 1, 2} mean {-1, 0, +1}; code 3 is illegal (N8).
    Ternary,
}

impl WeightFormat {
    /// Bits per code `B` (2 for ternary).
    #[must_use]
    pub fn bits(self) -> u32 {
        match self {
            WeightFormat::W2 | WeightFormat::Ternary => 2,
            WeightFormat::W4 => 4,
            WeightFormat::W8 => 8,
        }
    }

    /// `8 - B`: the shift onto the 8-bit lattice (N10), also the fractional bits of `zero_u8`.
    #[must_use]
    pub fn lattice_shift(self) -> u32 {
        8 - self.bits()
    }

    /// Largest legal code: `2^B - 1`, or 2 for ternary.
    #[must_use]
    pub fn max_code(self) -> u8 {
        match self {
            WeightFormat::Ternary => 2,
            WeightFormat::W2 => 3,
            WeightFormat::W4 => 15,
            WeightFormat::W8 => 255,
        }
    }
}

impl fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            WeightFormat::W2 => "w2",
            WeightFormat::W4 => "w4",
            WeightFormat::W8 => "w8",
            WeightFormat::Ternary => "ternary",
        };
        f.write_str(name)
    }
}

/// Why codes could not be packed or unpacked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PackError {
    /// A length did not match the shape it was declared with.
    Shape {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    /// A size parameter was zero.
    ZeroSize { what: &'static str },
    /// A code does not fit the format (`code > max_code`), except ternary code 3.
    CodeOutOfRange {
        index: usize,
        code: u8,
        format: WeightFormat,
    },
    /// Code 3 in a ternary tensor (N8).
    TernaryCode3 { index: usize },
    /// A 4-bit KV code above 15.
    Kv4CodeOutOfRange { index: usize, code: u8 },
    /// A padding code (past `k` in a row, N11) was not 0 when unpacking.
    NonZeroPadding {
        row: usize,
        position: usize,
        code: u8,
    },
}

impl fmt::Display for PackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PackError::Shape {
                what,
                expected,
                got,
            } => {
                write!(f, "{what}: expected {expected} elements, got {got}")
            }
            PackError::ZeroSize { what } => write!(f, "{what} must be at least 1"),
            PackError::CodeOutOfRange {
                index,
                code,
                format,
            } => write!(
                f,
                "code {code} at index {index} is out of range for {format} (max {})",
                format.max_code()
            ),
            PackError::TernaryCode3 { index } => {
                write!(
                    f,
                    "code 3 at index {index} is illegal in a ternary tensor (N8)"
                )
            }
            PackError::Kv4CodeOutOfRange { index, code } => {
                write!(
                    f,
                    "KV4 code {code} at index {index} is out of range (max 15)"
                )
            }
            PackError::NonZeroPadding {
                row,
                position,
                code,
            } => write!(
                f,
                "padding code at row {row}, position {position} is {code}, must be 0 (N11)"
            ),
        }
    }
}

impl std::error::Error for PackError {}

/// Codes per row after padding to whole groups: `ceil(k / group_len) * group_len` (N11).
#[must_use]
pub fn padded_row_len(k: usize, group_len: usize) -> usize {
    assert!(group_len >= 1, "padded_row_len: group_len is 0");
    k.div_ceil(group_len) * group_len
}

/// Bytes per packed row: `ceil(padded_row_len * B / 8)`; every row starts on a byte boundary.
#[must_use]
pub fn packed_row_bytes(k: usize, group_len: usize, format: WeightFormat) -> usize {
    bytes_for_codes(padded_row_len(k, group_len), format.bits())
}

/// Bytes that hold `count` codes of `bits` bits, the last byte zero-filled.
#[must_use]
pub fn bytes_for_codes(count: usize, bits: u32) -> usize {
    assert!(
        matches!(bits, 2 | 4 | 8),
        "bytes_for_codes: bits {bits} not in {{2, 4, 8}}"
    );
    (count * bits as usize).div_ceil(8)
}

/// Appends `codes` (each already `< 2^bits`) to `out`, little-endian within a byte, starting on
/// a fresh byte. The low-level layout shared by N11 and N11b.
fn pack_stream(codes: &[u8], bits: u32, out: &mut Vec<u8>) {
    assert!(
        matches!(bits, 2 | 4 | 8),
        "pack_stream: bits {bits} not in {{2, 4, 8}}"
    );
    let per_byte = (8 / bits) as usize;
    let start = out.len();
    out.resize(start + bytes_for_codes(codes.len(), bits), 0);
    for (j, &code) in codes.iter().enumerate() {
        assert!(
            u32::from(code) < (1u32 << bits),
            "pack_stream: code {code} wider than {bits}"
        );
        let shift = bits as usize * (j % per_byte);
        out[start + j / per_byte] |= code << shift;
    }
}

/// Code `j` of a little-endian packed stream of `bits`-bit codes.
#[must_use]
pub fn stream_code(bytes: &[u8], bits: u32, j: usize) -> u8 {
    assert!(
        matches!(bits, 2 | 4 | 8),
        "stream_code: bits {bits} not in {{2, 4, 8}}"
    );
    let per_byte = (8 / bits) as usize;
    let shift = bits as usize * (j % per_byte);
    let mask = if bits == 8 { 0xff } else { (1u8 << bits) - 1 };
    (bytes[j / per_byte] >> shift) & mask
}

fn check_weight_code(index: usize, code: u8, format: WeightFormat) -> Result<(), PackError> {
    if format == WeightFormat::Ternary && code == 3 {
        return Err(PackError::TernaryCode3 { index });
    }
    if code > format.max_code() {
        return Err(PackError::CodeOutOfRange {
            index,
            code,
            format,
        });
    }
    Ok(())
}

fn check_shape(n: usize, k: usize, group_len: usize) -> Result<(), PackError> {
    if n == 0 {
        return Err(PackError::ZeroSize { what: "rows n" });
    }
    if k == 0 {
        return Err(PackError::ZeroSize {
            what: "reduction length k",
        });
    }
    if group_len == 0 {
        return Err(PackError::ZeroSize {
            what: "group length",
        });
    }
    Ok(())
}

/// N11: packs row-major `[n][k]` codes, each row padded with code 0 to whole groups.
/// Rejects out-of-range codes, and code 3 in a ternary tensor.
pub fn pack_weights(
    codes: &[u8],
    n: usize,
    k: usize,
    group_len: usize,
    format: WeightFormat,
) -> Result<Vec<u8>, PackError> {
    check_shape(n, k, group_len)?;
    if codes.len() != n * k {
        return Err(PackError::Shape {
            what: "weight codes",
            expected: n * k,
            got: codes.len(),
        });
    }
    for (index, &code) in codes.iter().enumerate() {
        check_weight_code(index, code, format)?;
    }
    let k_padded = padded_row_len(k, group_len);
    let mut out = Vec::with_capacity(n * packed_row_bytes(k, group_len, format));
    for row in codes.chunks_exact(k) {
        let mut padded = row.to_vec();
        padded.resize(k_padded, 0);
        pack_stream(&padded, format.bits(), &mut out);
    }
    assert_eq!(out.len(), n * packed_row_bytes(k, group_len, format));
    Ok(out)
}

/// N11: the inverse of [`pack_weights`]: row-major `[n][k]` codes without the padding.
/// Rejects illegal codes and non-zero padding codes.
pub fn unpack_weights(
    packed: &[u8],
    n: usize,
    k: usize,
    group_len: usize,
    format: WeightFormat,
) -> Result<Vec<u8>, PackError> {
    check_shape(n, k, group_len)?;
    let row_bytes = packed_row_bytes(k, group_len, format);
    if packed.len() != n * row_bytes {
        return Err(PackError::Shape {
            what: "packed weight bytes",
            expected: n * row_bytes,
            got: packed.len(),
        });
    }
    let per_byte = (8 / format.bits()) as usize;
    let mut codes = Vec::with_capacity(n * k);
    for (row_index, row) in packed.chunks_exact(row_bytes).enumerate() {
        // Positions past k_padded in the last byte are byte padding, also required to be 0.
        for position in 0..row_bytes * per_byte {
            let code = stream_code(row, format.bits(), position);
            if position < k {
                check_weight_code(row_index * k + position, code, format)?;
                codes.push(code);
            } else if code != 0 {
                return Err(PackError::NonZeroPadding {
                    row: row_index,
                    position,
                    code,
                });
            }
        }
    }
    Ok(codes)
}

fn check_kv4_codes(codes: &[u8]) -> Result<(), PackError> {
    match codes.iter().position(|&c| c > 15) {
        Some(index) => Err(PackError::Kv4CodeOutOfRange {
            index,
            code: codes[index],
        }),
        None => Ok(()),
    }
}

/// Bytes of one packed key token group (N11b): `head_dim * ceil(group_tokens / 2)`.
#[must_use]
pub fn kv4_key_group_bytes(group_tokens: usize, head_dim: usize) -> usize {
    head_dim * bytes_for_codes(group_tokens, 4)
}

/// Bytes of one packed value token (N11b): `ceil(head_dim / 2)`.
#[must_use]
pub fn kv4_value_token_bytes(head_dim: usize) -> usize {
    bytes_for_codes(head_dim, 4)
}

/// N11b: packs the 4-bit key codes of one token group, given token-major `[t][c]`
/// (`t < group_tokens`), into channel-major `[c][t]`: each channel's codes contiguous, starting on
/// a byte boundary, two codes per byte, low nibble first.
pub fn pack_kv4_keys(
    codes_tc: &[u8],
    group_tokens: usize,
    head_dim: usize,
) -> Result<Vec<u8>, PackError> {
    if group_tokens == 0 {
        return Err(PackError::ZeroSize {
            what: "key group tokens",
        });
    }
    if head_dim == 0 {
        return Err(PackError::ZeroSize { what: "head_dim" });
    }
    let expected = group_tokens * head_dim;
    if codes_tc.len() != expected {
        return Err(PackError::Shape {
            what: "KV4 key codes",
            expected,
            got: codes_tc.len(),
        });
    }
    check_kv4_codes(codes_tc)?;
    let mut out = Vec::with_capacity(kv4_key_group_bytes(group_tokens, head_dim));
    for c in 0..head_dim {
        let channel: Vec<u8> = (0..group_tokens)
            .map(|t| codes_tc[t * head_dim + c])
            .collect();
        pack_stream(&channel, 4, &mut out);
    }
    Ok(out)
}

/// N11b: the inverse of [`pack_kv4_keys`], returning token-major `[t][c]` codes.
pub fn unpack_kv4_keys(
    packed: &[u8],
    group_tokens: usize,
    head_dim: usize,
) -> Result<Vec<u8>, PackError> {
    if group_tokens == 0 || head_dim == 0 {
        return Err(PackError::ZeroSize {
            what: "key group tokens and head_dim",
        });
    }
    let expected = kv4_key_group_bytes(group_tokens, head_dim);
    if packed.len() != expected {
        return Err(PackError::Shape {
            what: "packed KV4 key bytes",
            expected,
            got: packed.len(),
        });
    }
    let channel_bytes = bytes_for_codes(group_tokens, 4);
    let mut codes_tc = vec![0u8; group_tokens * head_dim];
    for (c, channel) in packed.chunks_exact(channel_bytes).enumerate() {
        for t in 0..group_tokens {
            codes_tc[t * head_dim + c] = stream_code(channel, 4, t);
        }
        if group_tokens % 2 == 1 && stream_code(channel, 4, group_tokens) != 0 {
            return Err(PackError::NonZeroPadding {
                row: c,
                position: group_tokens,
                code: stream_code(channel, 4, group_tokens),
            });
        }
    }
    Ok(codes_tc)
}

/// N11b: packs 4-bit value codes token-major `[t][c]`; each token starts on a byte boundary.
pub fn pack_kv4_values(
    codes_tc: &[u8],
    tokens: usize,
    head_dim: usize,
) -> Result<Vec<u8>, PackError> {
    if head_dim == 0 {
        return Err(PackError::ZeroSize { what: "head_dim" });
    }
    let expected = tokens * head_dim;
    if codes_tc.len() != expected {
        return Err(PackError::Shape {
            what: "KV4 value codes",
            expected,
            got: codes_tc.len(),
        });
    }
    check_kv4_codes(codes_tc)?;
    let mut out = Vec::with_capacity(tokens * kv4_value_token_bytes(head_dim));
    for token in codes_tc.chunks_exact(head_dim) {
        pack_stream(token, 4, &mut out);
    }
    Ok(out)
}

/// N11b: the inverse of [`pack_kv4_values`].
pub fn unpack_kv4_values(
    packed: &[u8],
    tokens: usize,
    head_dim: usize,
) -> Result<Vec<u8>, PackError> {
    if head_dim == 0 {
        return Err(PackError::ZeroSize { what: "head_dim" });
    }
    let token_bytes = kv4_value_token_bytes(head_dim);
    let expected = tokens * token_bytes;
    if packed.len() != expected {
        return Err(PackError::Shape {
            what: "packed KV4 value bytes",
            expected,
            got: packed.len(),
        });
    }
    let mut codes_tc = Vec::with_capacity(tokens * head_dim);
    for (t, token) in packed.chunks_exact(token_bytes).enumerate() {
        codes_tc.extend((0..head_dim).map(|c| stream_code(token, 4, c)));
        if head_dim % 2 == 1 && stream_code(token, 4, head_dim) != 0 {
            return Err(PackError::NonZeroPadding {
                row: t,
                position: head_dim,
                code: stream_code(token, 4, head_dim),
            });
        }
    }
    Ok(codes_tc)
}
