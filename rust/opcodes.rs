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
        if !(e == NEVER || e == ALWAYS || (e & 0xff00) == ONLY_ARG) {
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
    let Some(&op) = code.get(offset) else {
        return false;
    };
    match TABLE[op as usize].load(Relaxed) {
        NEVER => false,
        ALWAYS => true,
        e => code
            .get(offset + 1)
            .is_some_and(|&arg| arg as u16 == e & 0xff),
    }
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
        set_table(&[NEVER; 256]).unwrap();
    }
}
