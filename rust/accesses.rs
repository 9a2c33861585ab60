//! What the step from a scheduling point does, for explore mode's partial-order reduction
//! (`sched/explore.rs`): an [`Access`] per location (code object, instruction offset).
//!
//! A step runs from the hooked instruction at its point up to the next hooked one. It is a
//! read or a write of one location key when its first instruction is a name access (an
//! attribute name, a global name, a closure cell's name, or "a container item" for every
//! subscript and `in`) and every instruction after it up to the next hooked one is known to
//! touch nothing shared (local variables, constants, stack shuffles, comparisons, plain
//! arithmetic). An in-place operator after a read makes the step a write of that key (it may
//! mutate the value in place). Anything else (a call, a jump, a return, an unknown opcode)
//! makes the step opaque, dependent on every other step. Keys by name over-approximate keys
//! by object: two accesses of one name on different objects count as dependent.
//!
//! The opcode classes come from Python (`set_access_classes`), since opcode numbers differ
//! between interpreter versions.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering::Relaxed};

use parking_lot::Mutex;
use pyo3::ffi;
use pyo3::prelude::*;

use crate::opcodes;
use crate::sched::explore::Access;
use crate::sched::Location;

/// Classes of the table (one per opcode).
pub const OPAQUE: u8 = 0;
/// Touches nothing shared.
pub const SAFE: u8 = 1;
/// A binary operator: safe below the in-place threshold, else a write of the step's key.
pub const BINOP: u8 = 2;
/// `EXTENDED_ARG`: safe, but an access right after it is opaque (its argument is wider).
pub const EXTENDED: u8 = 3;
/// Reads / writes: or-ed with a family and, for names, the shift of the argument.
pub const READ: u8 = 0x10;
pub const WRITE: u8 = 0x20;
/// Families: attribute names (0), global names, closure cells, container items.
#[allow(dead_code)] // only Python names it (pytest_ftrace/ftrace/modes/explore.py)
pub const GLOBAL: u8 = 0x04;
pub const DEREF: u8 = 0x08;
pub const ITEM: u8 = 0x0c;
const FAMILY: u8 = 0x0c;
const SHIFT: u8 = 0x03;

#[allow(clippy::declare_interior_mutable_const)]
const UNSET: AtomicU8 = AtomicU8::new(OPAQUE);
static CLASSES: [AtomicU8; 256] = [UNSET; 256];
static INPLACE_FROM: AtomicU8 = AtomicU8::new(0);

/// Whether points record their access (an explore run is on).
static ENABLED: AtomicBool = AtomicBool::new(false);

static TABLE: Mutex<Option<HashMap<Location, Access>>> = Mutex::new(None);

/// An explore run starts (`on`) or another kind of run does: the table starts empty (code
/// objects of earlier runs may be gone and their addresses reused).
pub fn reset(on: bool) {
    *TABLE.lock() = None;
    ENABLED.store(on, Relaxed);
}

#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Relaxed)
}

/// The access of the step from `at` (opaque when unknown).
pub fn classify(at: Location) -> Access {
    TABLE
        .lock()
        .as_ref()
        .and_then(|m| m.get(&at).copied())
        .unwrap_or(Access::Opaque)
}

/// Check and install the class table: 256 classes, and where the in-place operators of
/// `BINARY_OP` start.
pub fn set_classes(classes: &[u8], inplace_from: u8) -> Result<(), String> {
    if classes.len() != 256 {
        return Err(format!(
            "the table needs 256 entries, not {}",
            classes.len()
        ));
    }
    for (slot, &c) in CLASSES.iter().zip(classes) {
        slot.store(c, Relaxed);
    }
    INPLACE_FROM.store(inplace_from, Relaxed);
    Ok(())
}

/// The access of a step that starts at `offset` of deoptimised bytecode `code`, given the
/// name its first instruction names (`name(family, index)`).
pub fn step_access(code: &[u8], offset: usize, name: &dyn Fn(u8, u32) -> Option<String>) -> Access {
    let (Some(&op), Some(&arg)) = (code.get(offset), code.get(offset + 1)) else {
        return Access::Opaque;
    };
    if offset >= 2 && CLASSES[code[offset - 2] as usize].load(Relaxed) == EXTENDED {
        return Access::Opaque;
    }
    let class = CLASSES[op as usize].load(Relaxed);
    let write = match class & 0x30 {
        READ => false,
        WRITE => true,
        _ => return Access::Opaque,
    };
    let family = class & FAMILY;
    let key = if family == ITEM {
        hash_key(ITEM, "")
    } else {
        match name(family, u32::from(arg) >> (class & SHIFT)) {
            Some(n) => hash_key(family, &n),
            None => return Access::Opaque,
        }
    };
    let mut write = write;
    let inplace_from = INPLACE_FROM.load(Relaxed);
    let mut i = offset + 2;
    while i + 1 < code.len() {
        if opcodes::kind(code, i).is_some() {
            break;
        }
        match CLASSES[code[i] as usize].load(Relaxed) {
            SAFE | EXTENDED => {}
            BINOP if code[i + 1] < inplace_from => {}
            BINOP => write = true,
            _ => return Access::Opaque,
        }
        i += 2;
    }
    if write {
        Access::Write(key)
    } else {
        Access::Read(key)
    }
}

fn hash_key(family: u8, name: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    family.hash(&mut h);
    name.hash(&mut h);
    h.finish()
}

/// Record the access of the step from `offset` of `code`, once per location.
///
/// # Safety
/// `code` is a live code object and the calling thread is attached to the interpreter.
pub unsafe fn note(code: *mut ffi::PyObject, offset: u32) {
    let at = (code as usize, offset);
    if TABLE.lock().as_ref().is_some_and(|m| m.contains_key(&at)) {
        return;
    }
    // SAFETY: attached (see above); `code` is borrowed for the length of this call.
    let py = unsafe { Python::assume_attached() };
    let obj = unsafe { Bound::from_borrowed_ptr(py, code) };
    let access = (|| -> Option<Access> {
        let bytes = obj.getattr("co_code").ok()?;
        let bytes: Vec<u8> = bytes.extract().ok()?;
        let name = |family: u8, index: u32| -> Option<String> {
            let found = if family == DEREF {
                obj.call_method1("_varname_from_oparg", (index,)).ok()?
            } else {
                obj.getattr("co_names").ok()?.get_item(index).ok()?
            };
            found.extract::<String>().ok()
        };
        Some(step_access(&bytes, offset as usize, &name))
    })()
    .unwrap_or(Access::Opaque);
    let _ = PyErr::take(py);
    TABLE
        .lock()
        .get_or_insert_with(HashMap::new)
        .insert(at, access);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_is_its_first_access_unless_something_opaque_follows() {
        // Opcodes: 10 hooked attribute read (shift 1), 11 hooked global write, 20 safe,
        // 21 binary operator (in-place from 13), 22 a call (opaque), 12 hooked item write.
        let mut hooked = vec![opcodes::NEVER; 256];
        for op in [10, 11, 12] {
            hooked[op] = opcodes::ALWAYS;
        }
        opcodes::set_table(&hooked).unwrap();
        let mut classes = vec![OPAQUE; 256];
        classes[10] = READ | 1;
        classes[11] = WRITE | GLOBAL;
        classes[12] = WRITE | ITEM;
        classes[20] = SAFE;
        classes[21] = BINOP;
        classes[0] = SAFE;
        set_classes(&classes, 13).unwrap();
        let name = |family: u8, index: u32| Some(format!("{family}:{index}"));
        let code = [
            10, 6, 20, 0, 11, 1, 21, 0, 10, 6, 21, 13, 12, 0, 10, 4, 22, 0, 12, 0,
        ];
        let n = step_access(&code, 0, &name);
        assert_eq!(n, Access::Read(hash_key(0, "0:3")));
        assert_eq!(
            step_access(&code, 4, &name),
            Access::Write(hash_key(GLOBAL, "4:1"))
        );
        assert_eq!(
            step_access(&code, 8, &name),
            Access::Write(hash_key(0, "0:3"))
        );
        assert_eq!(
            step_access(&code, 12, &name),
            Access::Write(hash_key(ITEM, ""))
        );
        assert_eq!(
            step_access(&code, 14, &name),
            Access::Opaque,
            "a call follows"
        );
        assert_eq!(
            step_access(&code, 16, &name),
            Access::Opaque,
            "not an access"
        );
        opcodes::set_table(&[opcodes::NEVER; 256]).unwrap();
    }
}
