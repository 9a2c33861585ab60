//! Which instructions are hooked: a 256-entry table indexed by opcode, filled from Python
//! (`pytest_ftrace.instrument` builds it from `opcode.opmap` of the running interpreter,
//! since opcode numbers differ between 3.12, 3.13 and 3.14). Pure logic, no Python.

use std::sync::atomic::{AtomicU16, Ordering::Relaxed};

/// Entry: not hooked.
pub const NEVER: u16 = 0;
/// Entry: hooked whatever the argument.
pub const ALWAYS: u16 = 0x100;
/// Entry `ONLY_ARG | a`: hooked when the argument byte is `a` (3.14's `BINARY_OP` with
/// `NB_SUBSCR`, which replaced `BINARY_SUBSCR`).
pub const ONLY_ARG: u16 = 0x200;
/// Entry of `RESUME`: not hooked itself (no INSTRUCTION event reaches it), but when its
/// argument's low two bits are not 0 (a resumption after a yield or an await), the
/// instruction after it is a generator point.
pub const RESUME_MARK: u16 = 0x400;
/// Kind bits, or-ed into an `ALWAYS` or `ONLY_ARG` entry: the point is a generator point
/// (`YIELD_VALUE`) or an iteration step (`FOR_ITER`, a point only for some iterators).
pub const KIND_GENERATOR: u16 = 0x1000;
pub const KIND_ITERATION: u16 = 0x2000;

/// What a hooked instruction is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A shared-state access (attribute, global, subscript, cell, `in`).
    Access,
    /// A yield, or the first instruction after a generator or coroutine resumed.
    Generator,
    /// A step of a `for` loop or comprehension (the caller checks the iterator).
    Iteration,
}

#[allow(clippy::declare_interior_mutable_const)]
const UNSET: AtomicU16 = AtomicU16::new(NEVER);
static TABLE: [AtomicU16; 256] = [UNSET; 256];

/// Check and install a table (256 entries, each `NEVER`, `ALWAYS` or `ONLY_ARG | byte`).
pub fn set_table(entries: &[u16]) -> Result<(), String> {
    if entries.len() != 256 {
        return Err(format!(
            "the table needs 256 entries, not {}",
            entries.len()
        ));
    }
    for (op, &e) in entries.iter().enumerate() {
        let mode = e & 0x0f00;
        let kind = e & 0xf000;
        let kind_ok = kind == 0 || kind == KIND_GENERATOR || kind == KIND_ITERATION;
        let ok = e == NEVER
            || e == RESUME_MARK
            || (kind_ok && (mode == ONLY_ARG || (mode == ALWAYS && e & 0xff == 0)));
        if !ok {
            return Err(format!("bad entry {e:#x} for opcode {op}"));
        }
    }
    for (slot, &e) in TABLE.iter().zip(entries) {
        slot.store(e, Relaxed);
    }
    Ok(())
}

pub fn table() -> Vec<u16> {
    TABLE.iter().map(|e| e.load(Relaxed)).collect()
}

/// Whether the instruction at byte `offset` of deoptimised bytecode `code` is hooked.
/// Out-of-range offsets are not.
#[inline]
pub fn is_hooked(code: &[u8], offset: usize) -> bool {
    kind(code, offset).is_some()
}

/// What the instruction at byte `offset` of deoptimised bytecode `code` is, None when it is
/// not hooked (out-of-range offsets are not).
#[inline]
pub fn kind(code: &[u8], offset: usize) -> Option<Kind> {
    let &op = code.get(offset)?;
    let e = TABLE[op as usize].load(Relaxed);
    let hooked = match e & 0x0f00 {
        ALWAYS => true,
        ONLY_ARG => code
            .get(offset + 1)
            .is_some_and(|&arg| arg as u16 == e & 0xff),
        _ => false,
    };
    if hooked {
        return Some(match e & 0xf000 {
            KIND_GENERATOR => Kind::Generator,
            KIND_ITERATION => Kind::Iteration,
            _ => Kind::Access,
        });
    }
    // The instruction right after a RESUME that follows a yield or an await.
    let prev = offset.checked_sub(2)?;
    let (&pop, &parg) = (code.get(prev)?, code.get(prev + 1)?);
    (TABLE[pop as usize].load(Relaxed) == RESUME_MARK && parg & 3 != 0).then_some(Kind::Generator)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_roundtrip_and_lookup() {
        let mut t = vec![NEVER; 256];
        t[10] = ALWAYS;
        t[20] = ONLY_ARG | 26;
        set_table(&t).unwrap();
        assert_eq!(table(), t);
        let code = [10u8, 0, 20, 26, 20, 0, 30, 0, 20];
        assert!(is_hooked(&code, 0));
        assert!(is_hooked(&code, 2));
        assert!(!is_hooked(&code, 4), "argument differs");
        assert!(!is_hooked(&code, 6));
        assert!(!is_hooked(&code, 8), "no argument byte");
        assert!(!is_hooked(&code, 100));
        assert!(set_table(&t[..10]).is_err());
        t[1] = 0x300;
        assert!(set_table(&t).is_err());
        t[1] = ALWAYS | 5;
        assert!(set_table(&t).is_err(), "ALWAYS takes no argument byte");
        t[1] = NEVER;
        // Kinds, and the instruction after a RESUME that is not a function's start.
        t[40] = ALWAYS | KIND_GENERATOR;
        t[41] = ALWAYS | KIND_ITERATION;
        t[42] = RESUME_MARK;
        set_table(&t).unwrap();
        let code = [
            42u8, 0, 30, 0, 40, 0, 42, 1, 30, 0, 42, 4, 30, 0, 41, 3, 10, 0,
        ];
        assert_eq!(kind(&code, 0), None, "RESUME itself is no point");
        assert_eq!(kind(&code, 2), None, "after a function's start");
        assert_eq!(kind(&code, 4), Some(Kind::Generator));
        assert_eq!(kind(&code, 8), Some(Kind::Generator), "after a resumption");
        assert_eq!(kind(&code, 12), None, "where bits 0: a start");
        assert_eq!(kind(&code, 14), Some(Kind::Iteration));
        assert_eq!(kind(&code, 16), Some(Kind::Access));
        t[43] = 0x4000;
        assert!(set_table(&t).is_err());
        set_table(&[NEVER; 256]).unwrap();
    }
}
