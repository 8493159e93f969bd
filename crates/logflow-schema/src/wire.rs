//! The fast path: protobuf wire bytes → BigQuery row JSON, walking the wire format with the
//! column plan and writing JSON bytes directly (no `DynamicMessage`, no intermediate values).
//!
//! Per message, the fields of interest are first indexed (number, wire type, byte span), then
//! written in plan order. This gives protobuf's semantics without materialising the message:
//! the last occurrence of a singular scalar wins, occurrences of a singular message merge,
//! repeated fields gather every occurrence (packed or not), the last set member of a oneof wins,
//! and map entries keep wire order with the last entry of a key at its last position.
//!
//! Hostile input is bounded: every length is checked against the bytes left before use, nothing
//! is allocated from a claimed length, varints are at most 10 bytes, groups nest at most
//! [`MAX_WIRE_DEPTH`] deep. A known field with an unexpected wire type is skipped as unknown.

use std::cell::RefCell;

use base64::Engine as _;
use logflow_core::json::push_str;
use prost_reflect::{DynamicMessage, Kind, MessageDescriptor};

use crate::error::{DecodeError, DecodeErrorKind};
use crate::plan::{FieldPlan, MessagePlan, Shape};
use crate::row::{proto_json, write_duration, write_timestamp};

const VARINT: u8 = 0;
const I64: u8 = 1;
const LEN: u8 = 2;
const START_GROUP: u8 = 3;
const END_GROUP: u8 = 4;
const I32: u8 = 5;
/// Deepest group nesting accepted on the wire (as the reference runtimes).
pub(crate) const MAX_WIRE_DEPTH: usize = 100;
/// Largest field number protobuf allows.
const MAX_FIELD_NUMBER: u64 = (1 << 29) - 1;

/// One occurrence of a planned field: its plan position, order on the wire, wire type, and the
/// byte span of its value (LEN: the payload; group: the content; others: the encoded value).
#[derive(Debug, Clone, Copy)]
struct Occ {
    pos: u32,
    seq: u32,
    wire: u8,
    start: u32,
    end: u32,
}

impl Occ {
    fn bytes<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[self.start as usize..self.end as usize]
    }
}

/// Reusable buffers, one level per nesting depth, so steady-state decoding does not allocate.
#[derive(Debug, Default)]
struct Scratch {
    levels: Vec<Vec<Occ>>,
    maps: Vec<MapBufs>,
}

/// The buffers of one map being written: per entry, its key occurrence and the range of its
/// value occurrences in `values`, and whether it is the last entry with its key.
#[derive(Debug, Default)]
struct MapBufs {
    entries: Vec<(Option<Occ>, std::ops::Range<usize>)>,
    values: Vec<Occ>,
    last: Vec<bool>,
}

impl Scratch {
    fn take_map(&mut self, depth: usize) -> MapBufs {
        if self.maps.len() <= depth {
            self.maps.resize_with(depth + 1, MapBufs::default);
        }
        std::mem::take(&mut self.maps[depth])
    }

    fn put_map(&mut self, depth: usize, mut m: MapBufs) {
        m.entries.clear();
        m.values.clear();
        m.last.clear();
        self.maps[depth] = m;
    }

    fn take(&mut self, depth: usize) -> Vec<Occ> {
        if self.levels.len() <= depth {
            self.levels.resize_with(depth + 1, Vec::new);
        }
        std::mem::take(&mut self.levels[depth])
    }

    fn put(&mut self, depth: usize, mut v: Vec<Occ>) {
        v.clear();
        self.levels[depth] = v;
    }
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

fn invalid(msg: impl Into<String>) -> DecodeError {
    DecodeError::new(DecodeErrorKind::InvalidProtobuf, msg)
}

/// Writes the columns of the root message `payload` into `out`; `first`: no column precedes
/// them (else a comma comes first).
pub(crate) fn write_root(
    plan: &MessagePlan,
    payload: &[u8],
    first: bool,
    out: &mut Vec<u8>,
) -> Result<(), DecodeError> {
    if payload.len() > u32::MAX as usize {
        return Err(invalid("payload larger than 4 GiB"));
    }
    let root = Occ {
        pos: 0,
        seq: 0,
        wire: LEN,
        start: 0,
        end: payload.len() as u32,
    };
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut scratch) => write_fields(plan, payload, &[root], first, &mut scratch, 0, out),
        // Only reachable if a caller re-entered from inside a decode: use fresh buffers.
        Err(_) => write_fields(
            plan,
            payload,
            &[root],
            first,
            &mut Scratch::default(),
            0,
            out,
        ),
    })
}

#[inline(always)]
fn read_varint(buf: &[u8], pos: &mut usize) -> Result<u64, DecodeError> {
    // Most varints (tags, small values) are one byte; lengths of log strings and small
    // numbers are two.
    if let Some(&b) = buf.get(*pos) {
        if b < 0x80 {
            *pos += 1;
            return Ok(u64::from(b));
        }
        if let Some(&c) = buf.get(*pos + 1)
            && c < 0x80
        {
            *pos += 2;
            return Ok(u64::from(b & 0x7f) | (u64::from(c) << 7));
        }
    }
    read_varint_slow(buf, pos)
}

#[inline(never)]
fn read_varint_slow(buf: &[u8], pos: &mut usize) -> Result<u64, DecodeError> {
    let mut v: u64 = 0;
    let mut shift = 0u32;
    loop {
        let Some(&b) = buf.get(*pos) else {
            return Err(invalid("truncated varint"));
        };
        *pos += 1;
        if shift == 63 && b > 1 {
            return Err(invalid("varint with bits beyond 64"));
        }
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Ok(v);
        }
        shift += 7;
        if shift > 63 {
            return Err(invalid("varint longer than 10 bytes"));
        }
    }
}

/// Reads a field key at `pos`: (number, wire type).
#[inline]
fn read_key(buf: &[u8], pos: &mut usize) -> Result<(u32, u8), DecodeError> {
    let key = read_varint(buf, pos)?;
    let number = key >> 3;
    if number == 0 || number > MAX_FIELD_NUMBER {
        return Err(invalid(format!("invalid field number {number}")));
    }
    Ok((number as u32, (key & 7) as u8))
}

/// Skips the value of a field with wire type `wire` at `pos`; returns the value's span
/// (for groups: the content, without the end tag).
fn skip_value(
    buf: &[u8],
    pos: &mut usize,
    number: u32,
    wire: u8,
    depth: usize,
) -> Result<(usize, usize), DecodeError> {
    let start = *pos;
    match wire {
        VARINT => {
            read_varint(buf, pos)?;
        }
        I64 | I32 => {
            let n = if wire == I64 { 8 } else { 4 };
            if buf.len() - *pos < n {
                return Err(invalid(format!(
                    "field {number}: truncated fixed-width value"
                )));
            }
            *pos += n;
        }
        LEN => {
            let len = read_varint(buf, pos)?;
            if len > (buf.len() - *pos) as u64 {
                return Err(invalid(format!(
                    "field {number}: length {len} past the end of the message"
                )));
            }
            let s = *pos;
            *pos += len as usize;
            return Ok((s, *pos));
        }
        START_GROUP => {
            if depth >= MAX_WIRE_DEPTH {
                return Err(invalid(format!(
                    "groups nested deeper than {MAX_WIRE_DEPTH}"
                )));
            }
            loop {
                if *pos >= buf.len() {
                    return Err(invalid(format!("group {number} without an end")));
                }
                let tag_start = *pos;
                let (n, w) = read_key(buf, pos)?;
                if w == END_GROUP {
                    if n != number {
                        return Err(invalid(format!("group {number} closed by end-group {n}")));
                    }
                    return Ok((start, tag_start));
                }
                skip_value(buf, pos, n, w, depth + 1)?;
            }
        }
        END_GROUP => return Err(invalid(format!("unexpected end-group {number}"))),
        w => return Err(invalid(format!("field {number}: invalid wire type {w}"))),
    }
    Ok((start, *pos))
}

/// The wire type a singular value of `kind` uses.
fn scalar_wire(kind: &Kind) -> u8 {
    match kind {
        Kind::Double | Kind::Fixed64 | Kind::Sfixed64 => I64,
        Kind::Float | Kind::Fixed32 | Kind::Sfixed32 => I32,
        Kind::String | Kind::Bytes | Kind::Message(_) => LEN,
        _ => VARINT,
    }
}

/// The wire types whose occurrences belong to field `f`, as a bit set (see [`FieldPlan::wires`]).
pub(crate) fn accepted_wires(f: &FieldPlan) -> u8 {
    (0..8u8)
        .filter(|&w| fits(f, w))
        .fold(0, |m, w| m | (1 << w))
}

/// Whether an occurrence with wire type `wire` belongs to field `f` (else it is unknown).
fn fits(f: &FieldPlan, wire: u8) -> bool {
    match &f.shape {
        Shape::Scalar(k) => {
            let w = scalar_wire(k);
            wire == w || (f.repeated && wire == LEN && w != LEN)
        }
        Shape::Enum(_) => wire == VARINT || (f.repeated && wire == LEN),
        Shape::Map { .. } => wire == LEN,
        _ => wire == LEN || (wire == START_GROUP && f.field.is_group()),
    }
}

/// Indexes the planned fields of the message made of `parts` into `occs`, sorted by plan
/// position then wire order.
fn index(
    plan: &MessagePlan,
    buf: &[u8],
    parts: &[Occ],
    depth: usize,
    occs: &mut Vec<Occ>,
) -> Result<(), DecodeError> {
    let mut seq = 0u32;
    // Encoders write fields in number order: then the occurrences are sorted already.
    let mut sorted = true;
    let mut last = 0u32;
    for part in parts {
        let slice = &buf[..part.end as usize];
        let mut pos = part.start as usize;
        while pos < slice.len() {
            let (number, wire) = read_key(slice, &mut pos)?;
            // The common wire types inline; fixed-width values and groups out of line.
            let (start, end) = match wire {
                VARINT => {
                    let s = pos;
                    read_varint(slice, &mut pos)?;
                    (s, pos)
                }
                LEN => {
                    let len = read_varint(slice, &mut pos)?;
                    if len > (slice.len() - pos) as u64 {
                        return Err(invalid(format!(
                            "field {number}: length {len} past the end of the message"
                        )));
                    }
                    let s = pos;
                    pos += len as usize;
                    (s, pos)
                }
                _ => skip_value(slice, &mut pos, number, wire, depth)?,
            };
            if let Some(i) = plan.position(number)
                && plan.fields[i].wires & (1 << wire) != 0
            {
                sorted &= i as u32 >= last;
                last = i as u32;
                occs.push(Occ {
                    pos: i as u32,
                    seq,
                    wire,
                    start: start as u32,
                    end: end as u32,
                });
                seq += 1;
            }
        }
    }
    if !sorted {
        occs.sort_unstable_by_key(|o| (o.pos, o.seq));
    }
    Ok(())
}

/// Writes the plan's columns of the message made of `parts`.
fn write_fields(
    plan: &MessagePlan,
    buf: &[u8],
    parts: &[Occ],
    mut first: bool,
    scratch: &mut Scratch,
    depth: usize,
    out: &mut Vec<u8>,
) -> Result<(), DecodeError> {
    let mut occs = scratch.take(depth);
    let r = index(plan, buf, parts, depth, &mut occs).and_then(|()| {
        // The last occurrence among the members of each oneof wins: (seq, position) per oneof,
        // on the stack for the usual few oneofs.
        let mut few = [(0u32, u32::MAX); 8];
        let mut many = Vec::new();
        let winners: &mut [(u32, u32)] = if plan.oneofs <= few.len() {
            &mut few[..plan.oneofs]
        } else {
            many.resize(plan.oneofs, (0, u32::MAX));
            &mut many
        };
        if plan.oneofs > 0 {
            for o in occs.iter() {
                if let Some(k) = plan.fields[o.pos as usize].oneof
                    && (winners[k].1 == u32::MAX || o.seq >= winners[k].0)
                {
                    winners[k] = (o.seq, o.pos);
                }
            }
        }
        let mut i = 0;
        for (fi, f) in plan.fields.iter().enumerate() {
            let s = i;
            while i < occs.len() && occs[i].pos as usize == fi {
                i += 1;
            }
            let mine = &occs[s..i];
            if mine.is_empty() {
                if f.required {
                    return Err(invalid(format!(
                        "missing required field {}",
                        f.field.full_name()
                    )));
                }
                if f.presence && !f.repeated {
                    continue;
                }
            } else if let Some(k) = f.oneof
                && winners[k].1 as usize != fi
            {
                continue;
            }
            if !first {
                out.push(b',');
            }
            first = false;
            out.extend_from_slice(&f.json_key);
            if mine.is_empty() {
                out.extend_from_slice(&f.default_json);
            } else if f.repeated {
                write_repeated(f, buf, mine, scratch, depth, out)?;
            } else if matches!(f.shape, Shape::Scalar(_) | Shape::Enum(_)) {
                let last = mine[mine.len() - 1];
                write_field_scalar(f, last.wire, last.bytes(buf), out)?;
            } else {
                write_message_value(&f.shape, buf, mine, scratch, depth, out)?;
            }
        }
        Ok(())
    });
    scratch.put(depth, occs);
    r
}

fn write_repeated(
    f: &FieldPlan,
    buf: &[u8],
    occs: &[Occ],
    scratch: &mut Scratch,
    depth: usize,
    out: &mut Vec<u8>,
) -> Result<(), DecodeError> {
    if let Shape::Map { key, value } = &f.shape {
        return write_map(key, value.as_deref(), buf, occs, scratch, depth, out);
    }
    out.push(b'[');
    let mut n = 0;
    for o in occs {
        match &f.shape {
            Shape::Scalar(_) | Shape::Enum(_) => {
                let w = match &f.shape {
                    Shape::Scalar(k) => scalar_wire(k),
                    _ => VARINT,
                };
                if o.wire == LEN && w != LEN {
                    // Packed: a run of values without keys.
                    let bytes = o.bytes(buf);
                    let mut p = 0;
                    while p < bytes.len() {
                        let s = p;
                        match w {
                            VARINT => {
                                read_varint(bytes, &mut p)?;
                            }
                            _ => {
                                let width = if w == I64 { 8 } else { 4 };
                                if bytes.len() - p < width {
                                    return Err(invalid(format!(
                                        "{}: packed field with a partial value",
                                        f.field.full_name()
                                    )));
                                }
                                p += width;
                            }
                        }
                        if n > 0 {
                            out.push(b',');
                        }
                        n += 1;
                        write_scalar(&f.shape, w, &bytes[s..p], out)?;
                    }
                    continue;
                }
                if n > 0 {
                    out.push(b',');
                }
                n += 1;
                write_field_scalar(f, o.wire, o.bytes(buf), out)?;
            }
            shape => {
                if n > 0 {
                    out.push(b',');
                }
                n += 1;
                write_message_value(shape, buf, std::slice::from_ref(o), scratch, depth, out)?;
            }
        }
    }
    out.push(b']');
    Ok(())
}

/// A map key in a comparable form.
#[derive(PartialEq, Eq, Hash, Clone, Copy)]
enum MapKey<'a> {
    Int(i128),
    Bytes(&'a [u8]),
}

fn map_key<'a>(kind: &Kind, occ: Option<Occ>, buf: &'a [u8]) -> Result<MapKey<'a>, DecodeError> {
    let Some(o) = occ else {
        return Ok(if matches!(kind, Kind::String) {
            MapKey::Bytes(&[])
        } else {
            MapKey::Int(0)
        });
    };
    let b = o.bytes(buf);
    Ok(match kind {
        Kind::String => MapKey::Bytes(b),
        _ => MapKey::Int(int_value(kind, o.wire, b)?),
    })
}

/// The integer value of a varint or fixed-width scalar, as the field's type reads it.
fn int_value(kind: &Kind, wire: u8, b: &[u8]) -> Result<i128, DecodeError> {
    Ok(match wire {
        VARINT => {
            let v = read_varint(b, &mut 0)?;
            match kind {
                Kind::Int32 => i128::from(v as i32),
                Kind::Uint32 => i128::from(v as u32),
                Kind::Sint32 => i128::from(zigzag32(v as u32)),
                Kind::Int64 => i128::from(v as i64),
                Kind::Sint64 => i128::from(zigzag64(v)),
                Kind::Bool => i128::from(v != 0),
                _ => i128::from(v),
            }
        }
        I32 => {
            let a = fixed::<4>(b)?;
            match kind {
                Kind::Sfixed32 => i128::from(i32::from_le_bytes(a)),
                _ => i128::from(u32::from_le_bytes(a)),
            }
        }
        _ => {
            let a = fixed::<8>(b)?;
            match kind {
                Kind::Sfixed64 => i128::from(i64::from_le_bytes(a)),
                _ => i128::from(u64::from_le_bytes(a)),
            }
        }
    })
}

fn fixed<const N: usize>(b: &[u8]) -> Result<[u8; N], DecodeError> {
    b.get(..N)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| invalid("truncated fixed-width value"))
}

fn zigzag32(v: u32) -> i32 {
    ((v >> 1) as i32) ^ -((v & 1) as i32)
}

fn zigzag64(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Map entries in wire order; for a repeated key only the last entry, at its position.
fn write_map(
    key: &Kind,
    value: Option<&Shape>,
    buf: &[u8],
    entries: &[Occ],
    scratch: &mut Scratch,
    depth: usize,
    out: &mut Vec<u8>,
) -> Result<(), DecodeError> {
    let mut m = scratch.take_map(depth);
    let r = write_map_with(key, value, buf, entries, &mut m, scratch, depth, out);
    scratch.put_map(depth, m);
    r
}

/// Above this many entries, duplicate keys are found with a hash map instead of by comparing
/// every pair (which would make a hostile map of a million entries quadratic).
const MAP_PAIRWISE_MAX: usize = 16;

#[allow(clippy::too_many_arguments)]
fn write_map_with(
    key: &Kind,
    value: Option<&Shape>,
    buf: &[u8],
    entries: &[Occ],
    m: &mut MapBufs,
    scratch: &mut Scratch,
    depth: usize,
    out: &mut Vec<u8>,
) -> Result<(), DecodeError> {
    let key_wire = scalar_wire(key);
    for e in entries {
        let slice = &buf[..e.end as usize];
        let mut pos = e.start as usize;
        let mut k = None;
        let vstart = m.values.len();
        while pos < slice.len() {
            let (number, wire) = read_key(slice, &mut pos)?;
            let (s, t) = skip_value(slice, &mut pos, number, wire, depth)?;
            let occ = Occ {
                pos: 0,
                seq: 0,
                wire,
                start: s as u32,
                end: t as u32,
            };
            match number {
                1 if wire == key_wire => k = Some(occ),
                2 if value.is_some_and(|v| value_fits(v, wire)) => {
                    // Scalars: last wins; messages: occurrences merge.
                    if matches!(value, Some(Shape::Scalar(_) | Shape::Enum(_))) {
                        m.values.truncate(vstart);
                    }
                    m.values.push(occ);
                }
                _ => {}
            }
        }
        m.entries.push((k, vstart..m.values.len()));
    }
    // Of entries with equal keys, the last one wins.
    let n = m.entries.len();
    if n <= MAP_PAIRWISE_MAX {
        for i in 0..n {
            let ki = map_key(key, m.entries[i].0, buf)?;
            let mut later = false;
            for j in i + 1..n {
                if map_key(key, m.entries[j].0, buf)? == ki {
                    later = true;
                    break;
                }
            }
            m.last.push(!later);
        }
    } else {
        let mut last_of = std::collections::HashMap::with_capacity(n);
        for (i, (k, _)) in m.entries.iter().enumerate() {
            last_of.insert(map_key(key, *k, buf)?, i);
        }
        for (i, (k, _)) in m.entries.iter().enumerate() {
            m.last
                .push(last_of.get(&map_key(key, *k, buf)?) == Some(&i));
        }
    }
    out.push(b'[');
    let mut written = 0;
    for (i, (k, vr)) in m.entries.iter().enumerate() {
        if !m.last[i] {
            continue; // a later entry has this key
        }
        if written > 0 {
            out.push(b',');
        }
        written += 1;
        out.extend_from_slice(b"{\"key\":");
        match k {
            Some(o) => write_scalar_kind(key, o.wire, o.bytes(buf), out)?,
            None => out.extend_from_slice(kind_default_json(key)),
        }
        if let Some(v) = value {
            out.extend_from_slice(b",\"value\":");
            let vs = &m.values[vr.clone()];
            match v {
                Shape::Scalar(vk) => match vs.last() {
                    Some(o) => write_scalar(v, o.wire, o.bytes(buf), out)?,
                    None => out.extend_from_slice(kind_default_json(vk)),
                },
                Shape::Enum(names) => match vs.last() {
                    Some(o) => write_scalar(v, o.wire, o.bytes(buf), out)?,
                    None => names.push(names.default_number, out),
                },
                shape => write_message_value(shape, buf, vs, scratch, depth, out)?,
            }
        }
        out.push(b'}');
    }
    out.push(b']');
    Ok(())
}

fn value_fits(shape: &Shape, wire: u8) -> bool {
    match shape {
        Shape::Scalar(k) => wire == scalar_wire(k),
        Shape::Enum(_) => wire == VARINT,
        _ => wire == LEN,
    }
}

fn kind_default_json(kind: &Kind) -> &'static [u8] {
    match kind {
        Kind::Double | Kind::Float => b"0.0",
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 | Kind::Uint64 | Kind::Fixed64 => b"\"0\"",
        Kind::Bool => b"false",
        Kind::String | Kind::Bytes => b"\"\"",
        _ => b"0",
    }
}

/// A message-typed value made of `parts` (its occurrences, merged).
fn write_message_value(
    shape: &Shape,
    buf: &[u8],
    parts: &[Occ],
    scratch: &mut Scratch,
    depth: usize,
    out: &mut Vec<u8>,
) -> Result<(), DecodeError> {
    match shape {
        Shape::Record(plan) => {
            out.push(b'{');
            write_fields(plan, buf, parts, true, scratch, depth + 1, out)?;
            out.push(b'}');
            Ok(())
        }
        Shape::Timestamp => {
            let (secs, nanos) = seconds_nanos(buf, parts)?;
            write_timestamp(secs, nanos, out)
        }
        Shape::Duration => {
            let (secs, nanos) = seconds_nanos(buf, parts)?;
            write_duration(secs, nanos, out)
        }
        Shape::Wrapper(kind) => {
            let want = scalar_wire(kind);
            let mut last = None;
            for_each_field(buf, parts, depth, |number, wire, s, t| {
                if number == 1 && wire == want {
                    last = Some((wire, s, t));
                }
            })?;
            match last {
                Some((wire, s, t)) => {
                    write_scalar(&Shape::Scalar(kind.clone()), wire, &buf[s..t], out)
                }
                None => {
                    out.extend_from_slice(kind_default_json(kind));
                    Ok(())
                }
            }
        }
        Shape::Json(md) => {
            let text = proto_json(&decode_dynamic(md, buf, parts)?)?;
            push_str(out, &text);
            Ok(())
        }
        Shape::FieldMask(md) => {
            let text = proto_json(&decode_dynamic(md, buf, parts)?)?;
            out.extend_from_slice(text.as_bytes());
            Ok(())
        }
        Shape::Scalar(_) | Shape::Enum(_) | Shape::Map { .. } => Err(DecodeError::new(
            DecodeErrorKind::InvalidValue,
            "scalar written as a message",
        )),
    }
}

/// The rare path (Struct, Any, too-deep or recursive messages): decode the value itself.
fn decode_dynamic(
    md: &MessageDescriptor,
    buf: &[u8],
    parts: &[Occ],
) -> Result<DynamicMessage, DecodeError> {
    let r = if let [one] = parts {
        DynamicMessage::decode(md.clone(), one.bytes(buf))
    } else {
        let joined: Vec<u8> = parts
            .iter()
            .flat_map(|p| p.bytes(buf).iter().copied())
            .collect();
        DynamicMessage::decode(md.clone(), joined.as_slice())
    };
    r.map_err(|e| invalid(format!("{}: {e}", md.full_name())))
}

/// Calls `f(number, wire, start, end)` for every field of the message made of `parts`.
fn for_each_field(
    buf: &[u8],
    parts: &[Occ],
    depth: usize,
    mut f: impl FnMut(u32, u8, usize, usize),
) -> Result<(), DecodeError> {
    for part in parts {
        let slice = &buf[..part.end as usize];
        let mut pos = part.start as usize;
        while pos < slice.len() {
            let (number, wire) = read_key(slice, &mut pos)?;
            let (s, t) = skip_value(slice, &mut pos, number, wire, depth)?;
            f(number, wire, s, t);
        }
    }
    Ok(())
}

/// Fields 1 (int64 seconds) and 2 (int32 nanos) of a Timestamp or Duration; last wins.
fn seconds_nanos(buf: &[u8], parts: &[Occ]) -> Result<(i64, i32), DecodeError> {
    let (mut secs, mut nanos) = (0u64, 0u64);
    let mut bad = None;
    for_each_field(buf, parts, 0, |number, wire, s, _| {
        if wire == VARINT && (number == 1 || number == 2) {
            let mut p = s;
            match read_varint(buf, &mut p) {
                Ok(v) if number == 1 => secs = v,
                Ok(v) => nanos = v,
                Err(e) => bad = Some(e),
            }
        }
    })?;
    if let Some(e) = bad {
        return Err(e);
    }
    Ok((secs as i64, nanos as i32))
}

/// A field's scalar value, transformed when the field holds personal data (strings only:
/// checked at plan time). Invalid UTF-8 stays a data error either way.
#[inline]
fn write_field_scalar(
    f: &FieldPlan,
    wire: u8,
    b: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), DecodeError> {
    match &f.pii {
        None => write_scalar(&f.shape, wire, b, out),
        Some(rule) => {
            if wire != LEN || std::str::from_utf8(b).is_err() {
                return Err(invalid("invalid UTF-8 in a string field"));
            }
            rule.push_json(b, out);
            Ok(())
        }
    }
}

/// A scalar or enum value from its wire bytes.
fn write_scalar(shape: &Shape, wire: u8, b: &[u8], out: &mut Vec<u8>) -> Result<(), DecodeError> {
    let kind = match shape {
        Shape::Enum(names) => {
            names.push(read_varint(b, &mut 0)? as i32, out);
            return Ok(());
        }
        Shape::Scalar(k) => k,
        _ => {
            return Err(DecodeError::new(
                DecodeErrorKind::InvalidValue,
                "message written as a scalar",
            ));
        }
    };
    write_scalar_kind(kind, wire, b, out)
}

/// Writes a non-enum scalar of type `kind`.
fn write_scalar_kind(
    kind: &Kind,
    wire: u8,
    b: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), DecodeError> {
    match kind {
        Kind::String => {
            logflow_core::json::push_utf8(out, b)
                .map_err(|_| invalid("invalid UTF-8 in a string field"))?;
        }
        Kind::Bytes => {
            out.push(b'"');
            let start = out.len();
            out.resize(start + base64::encoded_len(b.len(), true).unwrap_or(0), 0);
            let n = base64::engine::general_purpose::STANDARD
                .encode_slice(b, &mut out[start..])
                .unwrap_or(0);
            out.truncate(start + n);
            out.push(b'"');
        }
        Kind::Bool => out.extend_from_slice(if read_varint(b, &mut 0)? != 0 {
            b"true"
        } else {
            b"false"
        }),
        Kind::Float => {
            let x = f32::from_le_bytes(fixed::<4>(b)?);
            if x.is_finite() {
                out.extend_from_slice(ryu::Buffer::new().format_finite(x).as_bytes());
            } else {
                out.extend_from_slice(non_finite(f64::from(x)));
            }
        }
        Kind::Double => {
            let x = f64::from_le_bytes(fixed::<8>(b)?);
            if x.is_finite() {
                out.extend_from_slice(ryu::Buffer::new().format_finite(x).as_bytes());
            } else {
                out.extend_from_slice(non_finite(x));
            }
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 | Kind::Uint64 | Kind::Fixed64 => {
            // 64-bit integers as decimal strings: JSON numbers lose precision past 2^53.
            let v = int_value(kind, wire, b)?;
            out.push(b'"');
            out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
            out.push(b'"');
        }
        _ => {
            let v = int_value(kind, wire, b)?;
            out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
        }
    }
    Ok(())
}

fn non_finite(x: f64) -> &'static [u8] {
    if x.is_nan() {
        b"\"NaN\""
    } else if x > 0.0 {
        b"\"Infinity\""
    } else {
        b"\"-Infinity\""
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::registry_from_source;
    use crate::{RowEncoder, RowMeta};
    use prost::Message as _;
    use prost_reflect::{MapKey as PMapKey, Value};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use serde_json::Value as J;

    const RICH: &str = r#"syntax = "proto3"; package r;
        import "google/protobuf/timestamp.proto"; import "google/protobuf/duration.proto";
        import "google/protobuf/wrappers.proto";
        message Rich {
          int32 a = 1; sint32 b = 2; sfixed32 c = 3; uint32 d = 4; fixed32 e = 5;
          int64 f = 6; sint64 g = 7; sfixed64 h = 8; uint64 i = 9; fixed64 j = 10;
          float k = 11; double l = 12; bool m = 13; string n = 14; bytes o = 15; E p = 16;
          repeated int32 ra = 17; repeated sint64 rg = 18; repeated double rl = 19;
          repeated string rn = 20; repeated E rp = 21; repeated fixed32 re = 22 [packed = false];
          repeated Sub rs = 23; Sub s = 24; optional int64 of = 25; optional string on = 26;
          map<string, Sub> ms = 27; map<int64, string> mi = 28; map<bool, E> mb = 29;
          map<uint32, double> mu = 30; map<sint32, google.protobuf.Timestamp> mt = 31;
          google.protobuf.Timestamp ts = 32; google.protobuf.Duration du = 33;
          google.protobuf.Int64Value wi = 34; google.protobuf.StringValue ws = 35;
          google.protobuf.DoubleValue wd = 36; Rich self = 37;
          oneof pick { string left = 38; Sub right = 39; int32 middle = 40; }
        }
        enum E { E0 = 0; E1 = 1; E2 = 2; }
        message Sub { string name = 1; repeated int32 xs = 2; Inner inner = 3; }
        message Inner { bool flag = 1; bytes blob = 2; }"#;

    fn random_value(rng: &mut StdRng, kind: &Kind, depth: usize) -> Option<Value> {
        Some(match kind {
            Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => Value::I32({
                let r = rng.random();
                pick(rng, &[0, 1, -1, i32::MIN, i32::MAX, r])
            }),
            Kind::Uint32 | Kind::Fixed32 => Value::U32({
                let r = rng.random();
                pick(rng, &[0, 1, u32::MAX, r])
            }),
            Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => Value::I64({
                let r = rng.random();
                pick(rng, &[0, -1, i64::MIN, i64::MAX, r])
            }),
            Kind::Uint64 | Kind::Fixed64 => Value::U64({
                let r = rng.random();
                pick(rng, &[0, u64::MAX, r])
            }),
            Kind::Float => Value::F32({
                let r = rng.random();
                pick(
                    rng,
                    &[
                        0.0,
                        -0.0,
                        0.1,
                        f32::NAN,
                        f32::INFINITY,
                        f32::MIN_POSITIVE,
                        r,
                    ],
                )
            }),
            Kind::Double => Value::F64({
                let r = rng.random();
                pick(rng, &[0.0, 1e300, -2.5, f64::NAN, f64::NEG_INFINITY, r])
            }),
            Kind::Bool => Value::Bool(rng.random()),
            Kind::String => Value::String(
                pick(rng, &["", "héllo \"q\" \\ \n\t\u{1}", "日本語", "x"]).to_string(),
            ),
            Kind::Bytes => Value::Bytes(
                (0..rng.random_range(0..8))
                    .map(|_| rng.random::<u8>())
                    .collect::<Vec<u8>>()
                    .into(),
            ),
            Kind::Enum(_) => Value::EnumNumber(pick(rng, &[0, 1, 2, 7, -3])),
            Kind::Message(md) => Value::Message(random_message(rng, md, depth + 1)?),
        })
    }

    fn pick<T: Copy>(rng: &mut StdRng, xs: &[T]) -> T {
        xs[rng.random_range(0..xs.len())]
    }

    fn random_message(
        rng: &mut StdRng,
        md: &MessageDescriptor,
        depth: usize,
    ) -> Option<DynamicMessage> {
        if depth > 3 {
            return None;
        }
        let mut m = DynamicMessage::new(md.clone());
        match md.full_name() {
            "google.protobuf.Timestamp" => {
                m.set_field_by_number(
                    1,
                    Value::I64(rng.random_range(-62_135_596_800..253_402_300_799)),
                );
                m.set_field_by_number(2, Value::I32(rng.random_range(0..1_000_000_000)));
                return Some(m);
            }
            "google.protobuf.Duration" => {
                let s: i64 = rng.random_range(-1000..1000);
                let n: i32 = rng.random_range(0..1_000_000_000);
                m.set_field_by_number(1, Value::I64(s));
                m.set_field_by_number(2, Value::I32(if s < 0 { -n } else { n }));
                return Some(m);
            }
            _ => {}
        }
        for f in md.fields() {
            if rng.random_bool(0.3) {
                continue;
            }
            let v = if f.is_map() {
                let entry = f.kind().as_message().unwrap().clone();
                let mut map = std::collections::HashMap::new();
                for _ in 0..rng.random_range(0..4) {
                    let k = match random_value(rng, &entry.map_entry_key_field().kind(), depth)? {
                        Value::String(s) => PMapKey::String(s),
                        Value::I64(v) => PMapKey::I64(v),
                        Value::I32(v) => PMapKey::I32(v),
                        Value::U32(v) => PMapKey::U32(v),
                        Value::U64(v) => PMapKey::U64(v),
                        Value::Bool(v) => PMapKey::Bool(v),
                        _ => unreachable!(),
                    };
                    if let Some(v) = random_value(rng, &entry.map_entry_value_field().kind(), depth)
                    {
                        map.insert(k, v);
                    }
                }
                Value::Map(map)
            } else if f.is_list() {
                Value::List(
                    (0..rng.random_range(0..4))
                        .filter_map(|_| random_value(rng, &f.kind(), depth))
                        .collect(),
                )
            } else {
                match random_value(rng, &f.kind(), depth) {
                    Some(v) => v,
                    None => continue,
                }
            };
            m.set_field(&f, v);
        }
        Some(m)
    }

    /// Map columns (arrays of `{key, value}`) sorted by key: the reference sorts them, the
    /// wire path keeps wire order.
    fn normalize(v: &mut J) {
        match v {
            J::Array(items) => {
                items.iter_mut().for_each(normalize);
                if !items.is_empty()
                    && items
                        .iter()
                        .all(|i| i.as_object().is_some_and(|o| o.contains_key("key")))
                {
                    items.sort_by_key(|i| i["key"].to_string());
                }
            }
            J::Object(o) => {
                // JSON columns hold text whose map keys come in hash order: compare parsed.
                if let Some(J::String(text)) = o.get("self") {
                    let parsed: J = serde_json::from_str(text).expect("JSON column holds JSON");
                    o.insert("self".into(), parsed);
                }
                o.values_mut().for_each(normalize)
            }
            _ => {}
        }
    }

    fn meta() -> RowMeta<'static> {
        RowMeta {
            message_id: "m",
            publish_time_micros: 1,
            attributes: &[],
            subscription: "s",
            ingest_time_micros: 2,
        }
    }

    fn both(enc: &RowEncoder, payload: &[u8]) -> (Result<J, DecodeError>, Result<J, DecodeError>) {
        let run = |dynamic: bool| {
            let mut out = Vec::new();
            let r = if dynamic {
                enc.encode_dynamic(&meta(), payload, &mut out)
            } else {
                enc.encode(&meta(), payload, &mut out)
            };
            r.map(|()| {
                let mut v: J = serde_json::from_slice(&out).expect("valid JSON");
                normalize(&mut v);
                v
            })
        };
        (run(false), run(true))
    }

    #[test]
    fn matches_the_dynamic_message_reference_on_random_messages() {
        let r = registry_from_source("rich.proto", RICH);
        let md = r.message("r.Rich").unwrap();
        let enc = RowEncoder::new(md.clone()).unwrap();
        let mut rng = StdRng::seed_from_u64(42);
        for i in 0..2000 {
            let m = random_message(&mut rng, &md, 0).unwrap();
            let payload = m.encode_to_vec();
            let (fast, reference) = both(&enc, &payload);
            match (fast, reference) {
                (Ok(a), Ok(b)) => assert!(
                    a == b,
                    "case {i}:\nfast:      {a}\nreference: {b}\npayload {payload:02x?}"
                ),
                (a, b) => panic!("case {i}: fast {a:?} vs reference {b:?}, payload {payload:02x?}"),
            }
        }
    }

    fn rich() -> RowEncoder {
        let r = registry_from_source("rich2.proto", RICH);
        RowEncoder::new(r.message("r.Rich").unwrap()).unwrap()
    }

    fn row(enc: &RowEncoder, payload: &[u8]) -> Result<J, DecodeError> {
        let mut out = Vec::new();
        enc.encode(&meta(), payload, &mut out)?;
        Ok(serde_json::from_slice(&out).unwrap())
    }

    #[test]
    fn protobuf_merge_semantics() {
        let enc = rich();
        // a=1 then a=2: last wins. n="x" then n="y". s{name:"p"} then s{xs:[5]}: merged.
        let payload = [
            0x08, 0x01, 0x08, 0x02, // a
            0x72, 0x01, b'x', 0x72, 0x01, b'y', // n
            0xc2, 0x01, 0x03, 0x0a, 0x01, b'p', // s.name
            0xc2, 0x01, 0x02, 0x10, 0x05, // s.xs (unpacked)
            0xb2, 0x02, 0x01, b'L', // left = "L"
            0xc0, 0x02, 0x07, // middle = 7 (after left: middle wins)
        ];
        let v = row(&enc, &payload).unwrap();
        assert_eq!(v["a"], 2);
        assert_eq!(v["n"], "y");
        assert_eq!(v["s"]["name"], "p");
        assert_eq!(v["s"]["xs"], serde_json::json!([5]));
        assert_eq!(v["middle"], 7);
        assert!(v.get("left").is_none());
    }

    #[test]
    fn map_entries_keep_wire_order_and_the_last_duplicate() {
        let enc = rich();
        let entry = |k: u8, v: u8| [0xe2, 0x01, 0x06, 0x08, k, 0x12, 0x02, b'v', v];
        // mi (field 28): keys 3, 1, 3 → [1, 3(second value)]
        let mut payload = Vec::new();
        payload.extend(entry(3, b'a'));
        payload.extend(entry(1, b'b'));
        payload.extend(entry(3, b'c'));
        let v = row(&enc, &payload).unwrap();
        assert_eq!(
            v["mi"],
            serde_json::json!([{"key": "1", "value": "vb"}, {"key": "3", "value": "vc"}])
        );
    }

    #[test]
    fn a_huge_map_keeps_the_last_duplicate_without_quadratic_work() {
        let enc = rich();
        // 200,000 entries of mi (field 28) cycling over 1,000 keys: comparing every pair would
        // take ~10^10 steps; the hash path is linear. The last value of each key wins.
        let mut payload = Vec::new();
        for i in 0..200_000u32 {
            let k = i % 1000;
            let mut entry = vec![0x08];
            let mut v = k;
            while v >= 0x80 {
                entry.push((v as u8) | 0x80);
                v >>= 7;
            }
            entry.push(v as u8);
            let val = (i / 1000).to_string();
            entry.push(0x12);
            entry.push(val.len() as u8);
            entry.extend_from_slice(val.as_bytes());
            payload.extend([0xe2, 0x01, entry.len() as u8]);
            payload.extend(entry);
        }
        let v = row(&enc, &payload).unwrap();
        let mi = v["mi"].as_array().unwrap();
        assert_eq!(mi.len(), 1000);
        // Wire order of the last occurrences: keys 0..1000, all from the last round (199).
        for (k, e) in mi.iter().enumerate() {
            assert_eq!(e["key"], k.to_string());
            assert_eq!(e["value"], "199");
        }
    }

    #[test]
    fn varints_of_every_length_read_as_prost_writes_them_and_truncations_fail() {
        let mut values: Vec<u64> = vec![0, 1, u64::MAX];
        for bits in 1..64 {
            values.extend([(1u64 << bits) - 1, 1u64 << bits, (1u64 << bits) + 1]);
        }
        for v in values {
            let mut buf = Vec::new();
            prost::encoding::encode_varint(v, &mut buf);
            // At the end of the buffer and followed by more bytes (the fast paths look ahead).
            for tail in [&[][..], &[0x05, 0x80]] {
                let mut b = buf.clone();
                b.extend_from_slice(tail);
                let mut pos = 0;
                assert_eq!(read_varint(&b, &mut pos).unwrap(), v, "{b:02x?}");
                assert_eq!(pos, buf.len(), "{b:02x?}");
            }
            for cut in 0..buf.len() {
                assert!(
                    read_varint(&buf[..cut], &mut 0).is_err(),
                    "{v} cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn a_known_field_with_the_wrong_wire_type_is_skipped_as_unknown() {
        let enc = rich();
        // n (14) sent as a varint, then d (4) as a normal varint.
        let v = row(&enc, &[0x70, 0x05, 0x20, 0x09]).unwrap();
        assert_eq!(v["n"], "");
        assert_eq!(v["d"], 9);
    }

    #[test]
    fn hostile_inputs_are_classified_errors() {
        let enc = rich();
        let mut deep = Vec::new();
        for _ in 0..10_000 {
            deep.extend_from_slice(&[0xfb, 0x3e]); // start group 999
        }
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "11-byte varint",
                vec![
                    0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
                ],
            ),
            (
                "varint bits past 64",
                vec![
                    0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02,
                ],
            ),
            ("truncated varint", vec![0x08, 0xff]),
            ("length past the end", vec![0x72, 0x05, b'a']),
            ("claimed 64 MiB", vec![0x72, 0x80, 0x80, 0x80, 0x20, b'a']),
            ("invalid UTF-8", vec![0x72, 0x02, 0xc3, 0x28]),
            ("wire type 7", vec![0x0f, 0x00]),
            ("field number 0", vec![0x00, 0x00]),
            ("unclosed group", vec![0xfb, 0x3e, 0x08, 0x01]),
            ("stray end group", vec![0xfc, 0x3e]),
            ("deep groups", deep),
            ("truncated fixed64", vec![0x41, 0x01, 0x02]),
            (
                "partial packed fixed",
                vec![0xb2, 0x01, 0x03, 0x01, 0x02, 0x03],
            ),
        ];
        for (what, payload) in cases {
            let e = row(&enc, &payload).expect_err(what);
            assert_eq!(e.kind, DecodeErrorKind::InvalidProtobuf, "{what}: {e}");
        }
    }

    #[test]
    fn missing_required_proto2_field_is_an_error() {
        let r = registry_from_source(
            "p2.proto",
            "syntax = \"proto2\"; package p; message M { required int32 x = 1; optional int32 y = 2; }",
        );
        let enc = RowEncoder::new(r.message("p.M").unwrap()).unwrap();
        let e = row(&enc, &[0x10, 0x01]).unwrap_err();
        assert!(e.message.contains("p.M.x"), "{e}");
        let v = row(&enc, &[0x08, 0x05]).unwrap();
        assert_eq!(v["x"], 5);
        assert!(v.get("y").is_none(), "proto2 optional unset is NULL");
    }

    #[test]
    fn known_groups_are_records() {
        let r = registry_from_source(
            "g.proto",
            "syntax = \"proto2\"; package g; message M { optional group G = 1 { optional int32 v = 2; } optional int32 after = 3; }",
        );
        let enc = RowEncoder::new(r.message("g.M").unwrap()).unwrap();
        // G { v = 4 } then after = 9
        let v = row(&enc, &[0x0b, 0x10, 0x04, 0x0c, 0x18, 0x09]).unwrap();
        assert_eq!(v["g"]["v"], 4, "{v}");
        assert_eq!(v["after"], 9);
    }
}
