//! Explore policy: a systematic search of a test's interleavings, one round per execution.
//!
//! The schedule tree is searched depth first without keeping program states: each execution
//! follows the choices of the nodes kept from the last one (its prefix), then goes on without
//! preemptions (the thread that reached a point keeps the turn while it can), adding a node
//! per step. When it ends, its races add branches to its nodes, and the deepest node with a
//! branch left gives the next execution's prefix.
//!
//! Preemption bound: a branch that would make more preemptions than the bound (a choice of
//! another thread while the one that reached the point could go on) is not taken; a race
//! whose branch is beyond the bound at its node gets one at the start of the block of steps
//! the racing thread ran in instead, where the switch may cost nothing (bounded partial-order
//! reduction).
//!
//! Partial-order reduction (source sets and sleep sets): a step is described by its access
//! (a location key read or written, or opaque: anything the core cannot see, a call, a lock
//! operation, dependent on every other step). Two steps of different threads race when they
//! are dependent with no chain of dependent steps between them; the race is reversed by a
//! branch, at the earlier step, for a thread that can start the steps that do not depend on
//! it, unless such a thread has its branch there already. In a search taken as unbounded
//! ([`SLEEP_SETS_FROM`]), a thread whose branch at a node was explored also sleeps in its
//! siblings (with its next access) until a step dependent on it runs: running it there would
//! only reorder independent steps. With a bound, sleep sets are off: the branch they leave out
//! may be the only one within the bound.
//!
//! The tree itself is shared by every round's scheduler of a test ([`Shared`]).

use std::sync::Arc;

use parking_lot::Mutex;

use super::{Location, Scheduler};

/// What a step does to shared state, as far as the reduction is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// Unknown effects (a call, a lock, a thread's start): dependent on every step.
    Opaque,
    /// Reads the location key only.
    Read(u64),
    /// Writes (or may write) the location key.
    Write(u64),
    /// Writes the first key and releases the lock of the second (the last step of a `with
    /// lock:` block).
    Write2(u64, u64),
    /// Reads the first key and writes the second (a step that reads a name, then calls a
    /// container's method that changes its items).
    ReadWrite(u64, u64),
    /// Acquires the lock of its key (or tries to and blocks: the thread's next step, once it
    /// is woken, acquires it).
    Lock(u64),
    /// A worker's first step, touching nothing shared: independent of every step.
    Start,
    /// Touches nothing another thread can see (the code after a lock's release up to the
    /// next point, when it only uses locals): independent of every step.
    Local,
}

/// Whether running `a` and `b` in the other order may change what happens, or one of them
/// orders the other (a release and a later acquire of the lock: happens-before).
///
/// The dependency model: reads and writes conflict per key (a write with any access of its
/// key); two acquires of one lock conflict, and a release orders the next acquire of its
/// lock; steps touching nothing shared (a worker's start, the code after a release that only
/// uses locals) are independent of everything; an opaque step depends on every other.
pub fn dependent(a: Access, b: Access) -> bool {
    match (a, b) {
        (Access::Local | Access::Start, _) | (_, Access::Local | Access::Start) => false,
        (Access::Lock(x), other) | (other, Access::Lock(x)) => dependent(Access::Write(x), other),
        (Access::Write2(x, y), other) | (other, Access::Write2(x, y)) => {
            dependent(Access::Write(x), other) || dependent(Access::Write(y), other)
        }
        (Access::ReadWrite(x, y), other) | (other, Access::ReadWrite(x, y)) => {
            dependent(Access::Read(x), other) || dependent(Access::Write(y), other)
        }
        (Access::Read(_), Access::Read(_)) => false,
        (Access::Read(x) | Access::Write(x), Access::Read(y) | Access::Write(y)) => overlap(x, y),
        _ => true,
    }
}

/// Whether `a` then `b` is a race to reverse: dependent, and not a release of a lock then an
/// acquire of it (the acquire cannot run before the release; the race of the acquire is with
/// the acquire before that release, see [`Tree::races`]).
pub fn reversible(a: Access, b: Access) -> bool {
    match (a, b) {
        (Access::Write2(k, x), Access::Lock(y)) | (Access::Lock(y), Access::Write2(k, x))
            if x == y =>
        {
            dependent(Access::Write(k), Access::Lock(y))
        }
        _ => dependent(a, b),
    }
}

/// From this bound up the search is taken as unbounded, and sleep sets are used too: with a
/// smaller bound, a branch a sleep set leaves out may be the only one within the bound that
/// reaches some state (its equivalent, explored, interleaving needing more preemptions).
pub const SLEEP_SETS_FROM: u32 = 1000;

/// How many times in a row an execution whose round was not exact runs again from its prefix.
pub const MAX_RETRIES: u32 = 3;

/// Describes the step a thread waiting at a location would take.
pub type Classify<'a> = &'a dyn Fn(u32, Location) -> Access;

/// A key standing for every container's items (an item access whose container is unknown):
/// it overlaps every key of [`ITEM_FAMILY`].
pub const ANY_ITEM: u64 = u64::MAX;
/// The bit marking a key of one container's items.
pub const ITEM_FAMILY: u64 = 1 << 63;

/// The bit marking a key of an attribute name: [`ATTR_OBJECT`] holds the object's number in
/// the round (0: an object the classifier could not find, any object), the bits below it
/// the name's hash. Two objects' attributes of one name are two keys, so steps on an object
/// only one thread holds (one it made in the round and has not published) depend on no other
/// thread's step; an attribute of an unknown object overlaps that name on every object.
pub const ATTR_FAMILY: u64 = 1 << 62;
/// The bits of an attribute key holding its object's number plus one (0: any object).
pub const ATTR_OBJECT: u64 = ((1 << 22) - 1) << ATTR_NAME_BITS;
/// How many low bits of an attribute key hold its name's hash.
pub const ATTR_NAME_BITS: u32 = 40;

/// Whether two keys may name the same thing.
pub fn overlap(x: u64, y: u64) -> bool {
    if x == y {
        return true;
    }
    if x & ITEM_FAMILY != 0 || y & ITEM_FAMILY != 0 {
        return (x == ANY_ITEM && y & ITEM_FAMILY != 0) || (y == ANY_ITEM && x & ITEM_FAMILY != 0);
    }
    let name = !(ATTR_FAMILY | ATTR_OBJECT | ITEM_FAMILY);
    x & ATTR_FAMILY != 0
        && y & ATTR_FAMILY != 0
        && x & name == y & name
        && (x & ATTR_OBJECT == 0 || y & ATTR_OBJECT == 0)
}

#[derive(Clone, Debug)]
struct Node {
    /// The runnable threads and the access of the step each would take.
    enabled: Vec<(u32, Access)>,
    /// The thread that reached the point, when it could go on.
    current: Option<u32>,
    /// Preemptions of the decisions before this one.
    before: u32,
    /// Threads whose branch here is covered by one explored already, with their access.
    sleep: Vec<(u32, Access)>,
    /// The branch the execution under way takes.
    chosen: u32,
    /// Branches explored or under way.
    done: Vec<u32>,
    /// Branches still to explore (each within the bound).
    backtrack: Vec<u32>,
}

impl Node {
    fn access(&self, t: u32) -> Access {
        self.enabled
            .iter()
            .find(|&&(u, _)| u == t)
            .map_or(Access::Opaque, |&(_, a)| a)
    }

    fn cost(&self, t: u32) -> u32 {
        self.before + u32::from(self.current.is_some_and(|c| c != t))
    }
}

/// Counts of an exploration so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Executions run to their end.
    pub executions: u64,
    /// Branches found to explore and not run yet.
    pub pending: u64,
    /// Branches within the bound that the reduction left out (each would have been at least
    /// one more execution, equivalent to one that ran).
    pub pruned: u64,
    /// Branches left out for needing more preemptions than the bound.
    pub over_bound: u64,
    /// Executions that reached a node where every runnable thread slept (redundant).
    pub redundant: u64,
    /// Decisions of a prefix that could not be followed (the test took another path).
    pub divergences: u64,
    /// Executions run again from their prefix because their round was not exact (a thread
    /// ran outside the schedule: blocked in C, or late on a loaded machine): what they did
    /// is not what their schedule says, so neither their races nor a divergence count.
    pub retried: u64,
    /// Whether every branch within the bound has run.
    pub done: bool,
    /// The bound of the pass under way, and the bound asked for (see [`Tree::iterative`]).
    pub bound: u32,
    pub target: u32,
    /// Executions of the pass under way.
    pub pass_executions: u64,
    /// The longest execution seen (steps).
    pub longest: u64,
}

/// The exploration of one test: the nodes of the current path, one per step (depth first).
#[derive(Debug)]
pub struct Tree {
    bound: u32,
    /// Search again with a bound one higher until this one (iterative context bounding).
    target: u32,
    stack: Vec<Node>,
    started: bool,
    finished: bool,
    /// An execution is under way; it follows the first `prefix` nodes' choices.
    running: bool,
    prefix: usize,
    /// The sleep set after the prefix, then as the execution goes on.
    sleep: Vec<(u32, Access)>,
    next_sleep: Vec<(u32, Access)>,
    preemptions: u32,
    /// No more nodes in this execution (every runnable thread slept, or it diverged).
    blocked: bool,
    /// The step at which the execution could not follow its prefix.
    diverged: Option<usize>,
    /// The round under way was not exact (see [`Progress::retried`]); how many times in a
    /// row the same prefix has been run again for it.
    not_exact: bool,
    retries: u32,
    /// The sleep set the execution under way started with (restored for a retry).
    prefix_sleep: Vec<(u32, Access)>,
    /// Where the execution stopped adding nodes (every runnable thread slept): the runnable
    /// threads there and their next accesses.
    tail: Vec<(u32, Access)>,
    steps: u64,
    /// The threads whose last step of this execution was an acquire: its access and node.
    attempts: Vec<(u32, Access, usize)>,
    /// The keys the execution's steps (taken or pending) write, and whether one is opaque
    /// (found with its races).
    written: Vec<u64>,
    opaque: bool,
    /// The execution has two threads (no third one can run between the two).
    pair: bool,
    /// The subtrees of the first decision's other branches, set aside with their pending
    /// branches while another one runs (its thread, the nodes below the first): the search
    /// takes the first decision's subtrees in turn, one execution each, instead of one whole
    /// subtree after the other (see [`Tree::next_subtree`]).
    parked: Vec<(u32, Vec<Node>)>,
    progress: Progress,
}

impl Tree {
    pub fn new(bound: u32) -> Tree {
        Tree {
            bound,
            target: bound,
            stack: Vec::new(),
            started: false,
            finished: false,
            running: false,
            prefix: 0,
            sleep: Vec::new(),
            next_sleep: Vec::new(),
            preemptions: 0,
            blocked: false,
            diverged: None,
            not_exact: false,
            retries: 0,
            prefix_sleep: Vec::new(),
            tail: Vec::new(),
            steps: 0,
            attempts: Vec::new(),
            written: Vec::new(),
            opaque: false,
            pair: false,
            parked: Vec::new(),
            progress: Progress {
                bound,
                target: bound,
                ..Progress::default()
            },
        }
    }

    /// Iterative context bounding: every interleaving with no preemption first, then with at
    /// most one, and so on up to `bound` (each pass a whole search; the passes before the
    /// last run again what the last covers, for the fewest preemptions first: a bug that one
    /// preemption shows is found before any search within two). A bound taken as unbounded
    /// ([`SLEEP_SETS_FROM`]) is one pass.
    pub fn iterative(bound: u32) -> Tree {
        let first = if bound >= SLEEP_SETS_FROM { bound } else { 0 };
        let mut tree = Tree::new(first);
        tree.target = bound;
        tree.progress.target = bound;
        tree
    }

    /// The counts so far.
    pub fn progress(&self) -> Progress {
        let mut p = self.progress.clone();
        p.pending = self
            .stack
            .iter()
            .chain(self.parked.iter().flat_map(|(_, nodes)| nodes.iter()))
            .map(|n| n.backtrack.len() as u64)
            .sum::<u64>()
            + u64::from(self.running && !self.started);
        p.done = self.finished;
        p
    }

    fn begin(&mut self) {
        if self.running {
            self.end();
        }
        self.running = true;
        if self.finished {
            // Exploration over (a round beyond it): run without preemptions, no nodes.
            self.stack.clear();
            self.prefix = 0;
            self.blocked = true;
        } else {
            self.started = true;
            self.blocked = false;
        }
        self.sleep = std::mem::take(&mut self.next_sleep);
        self.prefix_sleep.clone_from(&self.sleep);
        self.preemptions = 0;
        self.diverged = None;
        self.not_exact = false;
        self.tail.clear();
        self.attempts.clear();
        self.steps = 0;
    }

    /// The decision at `step`; `runnable` ascending and never empty.
    pub fn choose(
        &mut self,
        step: u64,
        runnable: &[u32],
        current: Option<u32>,
        at: &dyn Fn(u32) -> Location,
        classify: Classify<'_>,
    ) -> u32 {
        if !self.running || step == 0 {
            self.begin();
        }
        self.steps += 1;
        let step = step as usize;
        let current = current.filter(|c| runnable.contains(c));
        let fallback = current.unwrap_or(runnable[0]);
        let chosen = if self.blocked {
            fallback
        } else if step < self.prefix && step < self.stack.len() {
            let want = self.stack[step].chosen;
            if runnable.contains(&want) {
                want
            } else {
                // The test took another path: the nodes below this one are not its (dropped
                // when the execution ends, unless its round was not exact: then it runs again).
                self.diverged = Some(step);
                self.blocked = true;
                fallback
            }
        } else if step != self.stack.len() {
            self.blocked = true; // a step the tree did not see (cannot happen)
            fallback
        } else {
            // A thread woken in a primitive right after a step that tried to acquire a lock
            // was blocked on that lock: that step did nothing, and its next one acquires it
            // (or finds it taken again and blocks).
            let mut enabled: Vec<(u32, Access)> = Vec::with_capacity(runnable.len());
            for &t in runnable {
                let (a, tried) = (at(t), self.tried(t));
                match tried {
                    Some((lock, node)) if a == super::AT_SYNC => {
                        self.failed(t, node);
                        enabled.push((t, lock));
                    }
                    _ => enabled.push((t, classify(t, a))),
                }
            }
            let awake = |t: u32| !self.sleep.iter().any(|&(s, _)| s == t);
            let pick = match current {
                Some(c) if awake(c) => Some(c),
                _ => enabled.iter().map(|&(t, _)| t).find(|&t| awake(t)),
            };
            match pick {
                None => {
                    self.blocked = true;
                    self.progress.redundant += 1;
                    self.tail = enabled;
                    fallback
                }
                Some(chosen) => {
                    let node = Node {
                        enabled,
                        current,
                        before: self.preemptions,
                        sleep: self.sleep.clone(),
                        chosen,
                        done: vec![chosen],
                        backtrack: Vec::new(),
                    };
                    let access = node.access(chosen);
                    self.stack.push(node);
                    self.sleep
                        .retain(|&(t, a)| t != chosen && !dependent(a, access));
                    chosen
                }
            }
        };
        if current.is_some_and(|c| c != chosen) {
            self.preemptions += 1;
        }
        if !self.blocked && step < self.stack.len() {
            let access = self.stack[step].access(chosen);
            self.attempts.retain(|&(t, _, _)| t != chosen);
            if matches!(access, Access::Lock(_)) {
                self.attempts.push((chosen, access, step));
            }
        }
        chosen
    }

    /// The acquire `t`'s last step tried and its node, if its last step was one.
    fn tried(&self, t: u32) -> Option<(Access, usize)> {
        self.attempts
            .iter()
            .find(|&&(u, _, _)| u == t)
            .map(|&(_, a, n)| (a, n))
    }

    /// The acquire `t` tried at `node` blocked: the step there changed nothing.
    fn failed(&mut self, t: u32, node: usize) {
        if let Some(entry) = self.stack[node].enabled.iter_mut().find(|e| e.0 == t) {
            entry.1 = Access::Local;
        }
    }

    /// The round under way is not exact: a thread ran outside the schedule.
    pub fn not_exact(&mut self) {
        self.not_exact = self.running;
    }

    /// The execution ended: find its races, then pick the next branch (deepest first). One
    /// whose round was not exact runs again from the same prefix (a few times in a row at
    /// most; then it is taken as it went, a divergence if it did not follow its prefix).
    pub fn end(&mut self) {
        if !self.running {
            return;
        }
        self.running = false;
        self.progress.executions += 1;
        self.progress.longest = self.progress.longest.max(self.steps);
        if self.finished {
            self.progress.pass_executions += 1;
            return;
        }
        if self.not_exact && self.retries < MAX_RETRIES {
            self.retries += 1;
            self.progress.retried += 1;
            self.stack.truncate(self.prefix);
            self.next_sleep = std::mem::take(&mut self.prefix_sleep);
            return;
        }
        self.retries = 0;
        self.progress.pass_executions += 1;
        match self.diverged {
            Some(step) => {
                self.progress.divergences += 1;
                self.stack.truncate(step + 1);
            }
            None => self.races(),
        }
        if self.next_subtree() {
            return;
        }
        loop {
            if self.stack.len() == 1 && self.stack[0].backtrack.is_empty() {
                // the first decision's subtree is done: on with one set aside, if any
                if !self.parked.is_empty() {
                    let (t, rest) = self.parked.remove(0);
                    self.stack[0].chosen = t;
                    self.stack.extend(rest);
                }
            }
            let Some(node) = self.stack.last_mut() else {
                break;
            };
            if let Some(t) = node.backtrack.pop() {
                let access = node.access(t);
                let mut sleep: Vec<(u32, Access)> = node.sleep.clone();
                sleep.extend(node.done.iter().map(|&d| (d, node.access(d))));
                sleep.retain(|&(s, a)| s != t && !dependent(a, access));
                if self.bound < SLEEP_SETS_FROM {
                    sleep.clear();
                }
                node.done.push(t);
                node.chosen = t;
                self.next_sleep = sleep;
                self.prefix = self.stack.len();
                return;
            }
            for &(t, _) in &node.enabled {
                if node.done.contains(&t) {
                    continue;
                }
                if node.cost(t) > self.bound {
                    self.progress.over_bound += 1;
                } else {
                    self.progress.pruned += 1;
                }
            }
            self.stack.pop();
        }
        self.prefix = 0;
        if self.bound < self.target {
            // The next pass, one preemption more, from a fresh tree.
            self.bound += 1;
            self.progress.bound = self.bound;
            self.progress.pass_executions = 0;
            self.next_sleep.clear();
            return;
        }
        self.finished = true;
    }

    /// Take the first decision's subtrees in turn. A depth-first search runs one subtree
    /// (the executions that start with one thread) to its end before the next; a failure that
    /// needs another thread first (a smaller value written late, two preemptions deep) then
    /// waits for a whole subtree that can be most of the budget. So while the subtree under
    /// way has branches pending and the first decision has another subtree (a branch queued
    /// there, or one set aside), the one under way is set aside and the next execution goes
    /// on with the next subtree. Each subtree still runs its own branches depth first and as
    /// they would run alone (races found in one add branches to its own nodes and to the
    /// first decision, whose explored and queued branches are the same whatever the order),
    /// so a whole search runs the same executions, in another order. Not with sleep sets
    /// (an unbounded search): the first decision's sleep sets depend on the order.
    fn next_subtree(&mut self) -> bool {
        if self.bound >= SLEEP_SETS_FROM || self.stack.len() < 2 {
            return false;
        }
        if self.stack[0].backtrack.is_empty() && self.parked.is_empty() {
            return false;
        }
        if !self.stack[1..].iter().any(|n| !n.backtrack.is_empty()) {
            return false; // this subtree is done: the loop in `end` pops it as before
        }
        let rest = self.stack.split_off(1);
        let root = &mut self.stack[0];
        self.parked.push((root.chosen, rest));
        if let Some(t) = root.backtrack.pop() {
            root.done.push(t);
            root.chosen = t;
            self.next_sleep.clear();
            self.prefix = 1;
            return true;
        }
        let (t, rest) = self.parked.remove(0);
        self.stack[0].chosen = t;
        self.stack.extend(rest);
        false // the loop in `end` takes the deepest pending branch of the subtree
    }

    /// Races of the execution: a step and a later dependent step of another thread with no
    /// chain of dependent steps between them, the later one taken or only pending (the next
    /// step of a runnable thread at a node). For each, the steps after the earlier one that
    /// do not depend on it, then the later step, could run in its place (source sets): unless
    /// one of the threads that could start that sequence has its branch at the earlier step
    /// (explored, queued or asleep), one of them gets a branch there.
    fn races(&mut self) {
        let n = self.stack.len();
        let steps: Vec<(u32, Access)> = self
            .stack
            .iter()
            .map(|node| (node.chosen, node.access(node.chosen)))
            .collect();
        self.written.clear();
        self.opaque = false;
        let every = self
            .stack
            .iter()
            .flat_map(|node| node.enabled.iter())
            .chain(self.tail.iter());
        for &(_, a) in every {
            match a {
                Access::Write(x) | Access::Lock(x) => self.written.push(x),
                Access::Write2(x, y) => self.written.extend([x, y]),
                Access::ReadWrite(_, y) => self.written.push(y),
                Access::Opaque => self.opaque = true,
                Access::Read(_) | Access::Start | Access::Local => {}
            }
        }
        self.written.sort_unstable();
        self.written.dedup();
        let mut ids: Vec<u32> = steps.iter().map(|&(t, _)| t).collect();
        for node in &self.stack {
            ids.extend(node.enabled.iter().map(|&(t, _)| t));
        }
        ids.extend(self.tail.iter().map(|&(t, _)| t));
        ids.sort_unstable();
        ids.dedup();
        self.pair = ids.len() == 2;
        let dense = |t: u32| ids.binary_search(&t).unwrap_or(0);
        let width = ids.len();
        // clocks[k][p]: how many of thread p's steps happen before step k (its own included).
        let mut clocks: Vec<Vec<u32>> = Vec::with_capacity(n);
        let mut last: Vec<Vec<u32>> = vec![vec![0; width]; width];
        let mut index = vec![0u32; n]; // a step's position among its thread's steps
        let mut count = vec![0u32; width];
        // (earlier step, later thread, the later step's clock, later step or n + pending)
        let mut found: Vec<(usize, u32, Vec<u32>, usize)> = Vec::new();
        // Races of a step of thread `tk` doing `ak` after the first `k` steps; returns its
        // clock without its own count.
        let race = |k: usize,
                    tk: u32,
                    ak: Access,
                    last: &Vec<Vec<u32>>,
                    clocks: &Vec<Vec<u32>>,
                    index: &Vec<u32>,
                    races: &mut Vec<usize>|
         -> Vec<u32> {
            // `clock` orders by every dependent step; `before`, for an acquire, only by the
            // acquires of its lock: it races with the acquire before a release (or an opaque
            // step, which may release) of the lock, not with the release.
            let acquire = matches!(ak, Access::Lock(_));
            let mut clock = last[dense(tk)].clone();
            let mut before = clock.clone();
            for m in (0..k).rev() {
                let (tm, am) = steps[m];
                if tm == tk || !dependent(am, ak) {
                    continue;
                }
                for (c, &o) in clock.iter_mut().zip(&clocks[m]) {
                    *c = (*c).max(o);
                }
                if !reversible(am, ak) {
                    continue;
                }
                if before[dense(tm)] <= index[m] {
                    races.push(m);
                }
                if !acquire || am == ak {
                    for (c, &o) in before.iter_mut().zip(&clocks[m]) {
                        *c = (*c).max(o);
                    }
                }
            }
            clock
        };
        let mut races = Vec::new();
        for k in 0..=n {
            let pending: &[(u32, Access)] = match self.stack.get(k) {
                Some(node) => &node.enabled,
                None => &self.tail,
            };
            for &(u, au) in pending {
                if k < n && u == steps[k].0 {
                    continue;
                }
                races.clear();
                let clock = race(k, u, au, &last, &clocks, &index, &mut races);
                for &m in &races {
                    found.push((m, u, clock.clone(), k));
                }
            }
            if k == n {
                break;
            }
            let (tk, ak) = steps[k];
            races.clear();
            let mut clock = race(k, tk, ak, &last, &clocks, &index, &mut races);
            for &m in &races {
                found.push((m, tk, clock.clone(), k));
            }
            let q = dense(tk);
            index[k] = count[q];
            count[q] += 1;
            clock[q] = count[q];
            last[q].clone_from(&clock);
            clocks.push(clock);
        }
        for (m, u, clock, k) in found {
            // The threads that could start (steps after m not after it) + the later step.
            let tm = dense(steps[m].0);
            let after_m = |c: &Vec<u32>| c[tm] > index[m];
            let mut first: Vec<Option<usize>> = vec![None; width];
            let mut initials: Vec<u32> = Vec::new();
            let mut consider = |t: u32, c: &Vec<u32>, e: Option<usize>| {
                let d = dense(t);
                if first[d].is_some() {
                    return; // an earlier step of its thread is in the sequence
                }
                let preceded = first
                    .iter()
                    .enumerate()
                    .any(|(p, f)| f.is_some_and(|f| p != d && c[p] > index[f]));
                if let Some(e) = e {
                    first[d] = Some(e);
                }
                if !preceded && !initials.contains(&t) {
                    initials.push(t);
                }
            };
            // the accesses of the sequence that reverses the race
            let mut sequence: Vec<Access> = Vec::new();
            for e in m + 1..k.min(n) {
                if !after_m(&clocks[e]) {
                    consider(steps[e].0, &clocks[e], Some(e));
                    sequence.push(steps[e].1);
                }
            }
            consider(u, &clock, None);
            sequence.push(if k < n && steps[k].0 == u {
                steps[k].1
            } else if k < n {
                self.stack[k].access(u)
            } else {
                self.tail
                    .iter()
                    .find(|&&(t, _)| t == u)
                    .map_or(Access::Opaque, |&(_, a)| a)
            });
            self.add_branch(m, &initials, &sequence);
        }
    }

    fn add_branch(&mut self, m: usize, initials: &[u32], sequence: &[Access]) {
        let node = &self.stack[m];
        let covered = |t: &u32| {
            node.done.contains(t)
                || node.backtrack.contains(t)
                || node.sleep.iter().any(|&(s, _)| s == *t)
        };
        if initials.is_empty() || initials.iter().any(covered) {
            return;
        }
        // The cheapest initial that can run here.
        let pick = initials
            .iter()
            .copied()
            .filter(|&t| node.enabled.iter().any(|&(u, _)| u == t))
            .min_by_key(|&t| node.cost(t));
        let Some(t) = pick else {
            // None can run here: every runnable thread (the classic rule).
            let all: Vec<u32> = node.enabled.iter().map(|&(u, _)| u).collect();
            for u in all {
                self.branch_within_bound(m, u, &[Access::Opaque]);
            }
            return;
        };
        self.branch_within_bound(m, t, sequence);
    }

    /// Queue `t` at node `m`, and before the block of steps the thread at `m` runs in
    /// (where switching to `t` may cost no preemption: a search bounded by preemptions needs
    /// both, bounded partial-order reduction). When the block's steps before `m` touch
    /// nothing shared, or only read keys no step of the execution writes (reads only when no
    /// step is opaque), and the execution has two threads, running `t` before them or after them is
    /// the same: the branch before the block alone stands for both, if it is within the
    /// bound. (With a third thread, where it runs relative to them may differ; with sleep
    /// sets, the branch left out here may be the one a sleeping thread needed.)
    fn branch_within_bound(&mut self, m: usize, t: u32, sequence: &[Access]) {
        let runner = self.stack[m].chosen;
        let mut j = m;
        while j > 0 && self.stack[j - 1].chosen == runner {
            j -= 1;
        }
        // (a read is quiet when no step writes its key, an opaque one included; a step
        // touching nothing shared is quiet whatever the others do)
        let quiet = |a: Access| match a {
            Access::Local | Access::Start => true,
            Access::Read(x) => !self.opaque && !self.written.iter().any(|&w| overlap(w, x)),
            _ => false,
        };
        let apart = self.pair
            && self.bound < SLEEP_SETS_FROM
            && (j..m).all(|e| {
                let a = self.stack[e].access(runner);
                quiet(a) && sequence.iter().all(|&b| !dependent(a, b))
            });
        if j != m && apart && self.try_branch(j, t) {
            return;
        }
        let here = self.try_branch(m, t);
        let before = j != m && self.try_branch(j, t);
        if !here && !before {
            self.progress.over_bound += 1;
        }
    }

    /// Queue branch `t` at node `m` unless it is covered; false when it is over the bound.
    fn try_branch(&mut self, m: usize, t: u32) -> bool {
        let bound = self.bound;
        let node = &mut self.stack[m];
        if !node.enabled.iter().any(|&(u, _)| u == t) {
            return true;
        }
        if node.done.contains(&t)
            || node.backtrack.contains(&t)
            || node.sleep.iter().any(|&(s, _)| s == t)
        {
            return true;
        }
        if node.cost(t) > bound {
            return false;
        }
        node.backtrack.push(t);
        true
    }
}

/// The version of [`Tree::to_words`]' layout (a tree from another layout is refused).
const WORDS_FORMAT: u64 = 3;

/// Writes a tree's fields as words.
struct Words(Vec<u64>);

impl Words {
    fn put(&mut self, v: u64) {
        self.0.push(v);
    }

    fn flag(&mut self, v: bool) {
        self.0.push(u64::from(v));
    }

    fn access(&mut self, a: Access) {
        let (tag, x, y) = match a {
            Access::Opaque => (0, 0, 0),
            Access::Read(k) => (1, k, 0),
            Access::Write(k) => (2, k, 0),
            Access::Write2(k, l) => (3, k, l),
            Access::Lock(k) => (4, k, 0),
            Access::Start => (5, 0, 0),
            Access::Local => (6, 0, 0),
            Access::ReadWrite(k, l) => (7, k, l),
        };
        self.0.extend([tag, x, y]);
    }

    fn threads(&mut self, list: &[(u32, Access)]) {
        self.put(list.len() as u64);
        for &(t, a) in list {
            self.put(u64::from(t));
            self.access(a);
        }
    }

    fn nodes(&mut self, nodes: &[Node]) {
        self.put(nodes.len() as u64);
        for node in nodes {
            let Node {
                enabled,
                current,
                before,
                sleep,
                chosen,
                done,
                backtrack,
            } = node;
            self.threads(enabled);
            self.put(current.map_or(u64::MAX, u64::from));
            self.put(u64::from(*before));
            self.threads(sleep);
            self.put(u64::from(*chosen));
            self.ids(done);
            self.ids(backtrack);
        }
    }

    fn ids(&mut self, list: &[u32]) {
        self.put(list.len() as u64);
        self.0.extend(list.iter().map(|&t| u64::from(t)));
    }
}

/// Reads them back; None when the words end early or hold a value out of range.
struct Reader<'a>(std::slice::Iter<'a, u64>);

impl Reader<'_> {
    fn get(&mut self) -> Option<u64> {
        self.0.next().copied()
    }

    fn id(&mut self) -> Option<u32> {
        u32::try_from(self.get()?).ok()
    }

    fn count(&mut self) -> Option<usize> {
        let n = usize::try_from(self.get()?).ok()?;
        (n <= self.0.len()).then_some(n) // no list is longer than the words left
    }

    fn flag(&mut self) -> Option<bool> {
        match self.get()? {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }

    fn access(&mut self) -> Option<Access> {
        let (tag, x, y) = (self.get()?, self.get()?, self.get()?);
        Some(match tag {
            0 => Access::Opaque,
            1 => Access::Read(x),
            2 => Access::Write(x),
            3 => Access::Write2(x, y),
            4 => Access::Lock(x),
            5 => Access::Start,
            6 => Access::Local,
            7 => Access::ReadWrite(x, y),
            _ => return None,
        })
    }

    fn threads(&mut self) -> Option<Vec<(u32, Access)>> {
        (0..self.count()?)
            .map(|_| Some((self.id()?, self.access()?)))
            .collect()
    }

    fn nodes(&mut self) -> Option<Vec<Node>> {
        (0..self.count()?)
            .map(|_| {
                Some(Node {
                    enabled: self.threads()?,
                    current: match self.get()? {
                        u64::MAX => None,
                        t => Some(u32::try_from(t).ok()?),
                    },
                    before: self.id()?,
                    sleep: self.threads()?,
                    chosen: self.id()?,
                    done: self.ids()?,
                    backtrack: self.ids()?,
                })
            })
            .collect()
    }

    fn ids(&mut self) -> Option<Vec<u32>> {
        (0..self.count()?).map(|_| self.id()).collect()
    }
}

impl Tree {
    /// The whole tree as words, to hand it to another process and back (explore's executions
    /// forked from the test's starting state: ftrace/modes/explore.py): that process's tree,
    /// made with [`Tree::from_words`], goes on exactly as this one would. Every field is
    /// written (a field added to the tree or its nodes must be added here: the destructuring
    /// below does not compile without it).
    pub fn to_words(&self) -> Vec<u64> {
        let Tree {
            bound,
            target,
            stack,
            started,
            finished,
            running,
            prefix,
            sleep,
            next_sleep,
            preemptions,
            blocked,
            diverged,
            not_exact,
            retries,
            prefix_sleep,
            tail,
            steps,
            attempts,
            written,
            opaque,
            pair,
            parked,
            progress,
        } = self;
        let mut w = Words(Vec::with_capacity(64 + stack.len() * 16));
        w.put(WORDS_FORMAT);
        w.put(u64::from(*bound));
        w.put(u64::from(*target));
        for f in [
            *started, *finished, *running, *blocked, *not_exact, *opaque, *pair,
        ] {
            w.flag(f);
        }
        w.put(diverged.map_or(u64::MAX, |d| d as u64));
        w.put(u64::from(*retries));
        w.threads(prefix_sleep);
        w.put(*prefix as u64);
        w.put(u64::from(*preemptions));
        w.put(*steps);
        w.threads(sleep);
        w.threads(next_sleep);
        w.threads(tail);
        w.put(attempts.len() as u64);
        for &(t, a, node) in attempts {
            w.put(u64::from(t));
            w.access(a);
            w.put(node as u64);
        }
        w.put(written.len() as u64);
        w.0.extend(written.iter().copied());
        let Progress {
            executions,
            pending,
            pruned,
            over_bound,
            redundant,
            divergences,
            done,
            bound: pass_bound,
            target: asked,
            pass_executions,
            longest,
            retried,
        } = progress;
        w.0.extend([
            *executions,
            *pending,
            *pruned,
            *over_bound,
            *redundant,
            *divergences,
            u64::from(*done),
            u64::from(*pass_bound),
            u64::from(*asked),
            *pass_executions,
            *longest,
            *retried,
        ]);
        w.nodes(stack);
        w.put(parked.len() as u64);
        for (t, nodes) in parked {
            w.put(u64::from(*t));
            w.nodes(nodes);
        }
        w.0
    }

    /// The tree [`Tree::to_words`] wrote; None when `words` are not such a tree.
    pub fn from_words(words: &[u64]) -> Option<Tree> {
        let mut r = Reader(words.iter());
        if r.get()? != WORDS_FORMAT {
            return None;
        }
        let bound = r.id()?;
        let target = r.id()?;
        let mut flags = [false; 7];
        for f in &mut flags {
            *f = r.flag()?;
        }
        let [started, finished, running, blocked, not_exact, opaque, pair] = flags;
        let diverged = match r.get()? {
            u64::MAX => None,
            d => Some(usize::try_from(d).ok()?),
        };
        let retries = r.id()?;
        let prefix_sleep = r.threads()?;
        let prefix = usize::try_from(r.get()?).ok()?;
        let preemptions = r.id()?;
        let steps = r.get()?;
        let sleep = r.threads()?;
        let next_sleep = r.threads()?;
        let tail = r.threads()?;
        let attempts = (0..r.count()?)
            .map(|_| Some((r.id()?, r.access()?, usize::try_from(r.get()?).ok()?)))
            .collect::<Option<Vec<_>>>()?;
        let written = (0..r.count()?)
            .map(|_| r.get())
            .collect::<Option<Vec<_>>>()?;
        let progress = Progress {
            executions: r.get()?,
            pending: r.get()?,
            pruned: r.get()?,
            over_bound: r.get()?,
            redundant: r.get()?,
            divergences: r.get()?,
            done: r.flag()?,
            bound: r.id()?,
            target: r.id()?,
            pass_executions: r.get()?,
            longest: r.get()?,
            retried: r.get()?,
        };
        let stack = r.nodes()?;
        let parked = (0..r.count()?)
            .map(|_| Some((r.id()?, r.nodes()?)))
            .collect::<Option<Vec<_>>>()?;
        if r.get().is_some() {
            return None; // words left over: not a tree of this layout
        }
        Some(Tree {
            bound,
            target,
            stack,
            started,
            finished,
            running,
            prefix,
            sleep,
            next_sleep,
            preemptions,
            blocked,
            diverged,
            not_exact,
            retries,
            prefix_sleep,
            tail,
            steps,
            attempts,
            written,
            opaque,
            pair,
            parked,
            progress,
        })
    }
}

/// The tree of one test, shared by the schedulers of its rounds.
#[derive(Clone)]
pub struct Shared(pub Arc<Mutex<Tree>>);

impl Shared {
    pub fn new(bound: u32) -> Shared {
        Shared(Arc::new(Mutex::new(Tree::iterative(bound))))
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Explore(bound {})", self.0.lock().bound)
    }
}

impl PartialEq for Shared {
    fn eq(&self, other: &Shared) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Shared {}

/// One round's scheduler: an execution of the shared tree.
pub struct ExploreScheduler {
    tree: Shared,
    classify: fn(u32, Location) -> Access,
}

impl ExploreScheduler {
    pub fn new(tree: Shared, classify: fn(u32, Location) -> Access) -> ExploreScheduler {
        ExploreScheduler { tree, classify }
    }
}

impl Scheduler for ExploreScheduler {
    fn choose(&mut self, step: u64, runnable: &[u32], current: Option<u32>) -> u32 {
        self.choose_at(step, runnable, current, &|_| super::AT_START)
    }

    fn choose_at(
        &mut self,
        step: u64,
        runnable: &[u32],
        current: Option<u32>,
        at: &dyn Fn(u32) -> Location,
    ) -> u32 {
        let classify = self.classify;
        self.tree
            .0
            .lock()
            .choose(step, runnable, current, at, &classify)
    }

    fn round_end(&mut self) {
        self.tree.0.lock().end();
    }

    fn round_not_exact(&mut self) {
        self.tree.0.lock().not_exact();
    }

    fn divergences(&self) -> u64 {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeSet, HashMap};

    /// A program of threads, each a list of accesses; a thread is runnable until its list
    /// is done. Locations are (thread, index).
    struct Program {
        threads: Vec<Vec<Access>>,
    }

    impl Program {
        fn classify(&self) -> impl Fn(u32, Location) -> Access + '_ {
            move |_, (t, i)| {
                self.threads[t]
                    .get(i as usize)
                    .copied()
                    .unwrap_or(Access::Opaque)
            }
        }

        /// Run one execution against the tree: the order of (thread, index) steps.
        fn run(&self, tree: &mut Tree) -> Vec<(u32, usize)> {
            let mut pos = vec![0usize; self.threads.len()];
            let mut order = Vec::new();
            let mut current: Option<u32> = None;
            let classify = self.classify();
            for step in 0.. {
                let runnable: Vec<u32> = (0..self.threads.len() as u32)
                    .filter(|&t| pos[t as usize] < self.threads[t as usize].len())
                    .collect();
                if runnable.is_empty() {
                    break;
                }
                let snapshot = pos.clone();
                let at = move |t: u32| (t as usize, snapshot[t as usize] as u32);
                let c = tree.choose(step, &runnable, current, &at, &classify);
                order.push((c, pos[c as usize]));
                pos[c as usize] += 1;
                current = Some(c);
            }
            tree.end();
            order
        }

        fn explore(&self, bound: u32) -> (Vec<Vec<(u32, usize)>>, Progress) {
            let mut tree = Tree::new(bound);
            let mut runs = Vec::new();
            loop {
                runs.push(self.run(&mut tree));
                if tree.progress().done || runs.len() > 100_000 {
                    break;
                }
            }
            (runs, tree.progress())
        }

        /// The final values of each key after an order: a stand-in for the outcome (a read
        /// sees the number of writes to its key so far).
        fn outcome(&self, order: &[(u32, usize)]) -> Vec<(u32, usize, u64)> {
            let mut writes: HashMap<u64, u64> = HashMap::new();
            let mut seen = Vec::new();
            for &(t, i) in order {
                match self.threads[t as usize][i] {
                    Access::Read(k) => seen.push((t, i, *writes.get(&k).unwrap_or(&0))),
                    Access::Write(k) => *writes.entry(k).or_default() += 1,
                    Access::Opaque => *writes.entry(u64::MAX).or_default() += 1,
                    Access::Start | Access::Local => {}
                    Access::Lock(a) => *writes.entry(a).or_default() += 1,
                    Access::ReadWrite(a, b) => {
                        seen.push((t, i, *writes.get(&a).unwrap_or(&0)));
                        *writes.entry(b).or_default() += 1;
                    }
                    Access::Write2(a, b) => {
                        *writes.entry(a).or_default() += 1;
                        *writes.entry(b).or_default() += 1;
                    }
                }
            }
            seen.sort();
            seen
        }
    }

    fn preemptions(order: &[(u32, usize)], lens: &[usize]) -> u32 {
        let mut n = 0;
        for w in order.windows(2) {
            let (a, i) = w[0];
            if w[1].0 != a && i + 1 < lens[a as usize] {
                n += 1;
            }
        }
        n
    }

    /// Every interleaving of the threads (for small programs).
    fn all_orders(lens: &[usize]) -> Vec<Vec<(u32, usize)>> {
        fn rec(
            lens: &[usize],
            pos: &mut Vec<usize>,
            cur: &mut Vec<(u32, usize)>,
            out: &mut Vec<Vec<(u32, usize)>>,
        ) {
            let mut any = false;
            for t in 0..lens.len() {
                if pos[t] < lens[t] {
                    any = true;
                    cur.push((t as u32, pos[t]));
                    pos[t] += 1;
                    rec(lens, pos, cur, out);
                    pos[t] -= 1;
                    cur.pop();
                }
            }
            if !any {
                out.push(cur.clone());
            }
        }
        let mut out = Vec::new();
        rec(lens, &mut vec![0; lens.len()], &mut Vec::new(), &mut out);
        out
    }

    #[test]
    fn without_reduction_every_bounded_interleaving_runs_once() {
        let p = Program {
            threads: vec![vec![Access::Opaque; 3], vec![Access::Opaque; 3]],
        };
        let lens = [3, 3];
        for bound in 0..=3 {
            let (runs, progress) = p.explore(bound);
            let distinct: BTreeSet<_> = runs.iter().cloned().collect();
            assert_eq!(distinct.len(), runs.len(), "no execution twice");
            let want: BTreeSet<_> = all_orders(&lens)
                .into_iter()
                .filter(|o| preemptions(o, &lens) <= bound)
                .collect();
            assert_eq!(distinct, want, "bound {bound}");
            assert!(progress.done);
            assert_eq!(progress.pruned, 0);
        }
        // With no bound that matters, all 20 orders of 3+3 steps.
        assert_eq!(p.explore(10).0.len(), 20);
    }

    #[test]
    fn passes_go_by_the_bound_fewest_preemptions_first() {
        let p = Program {
            threads: vec![vec![Access::Opaque; 3], vec![Access::Opaque; 3]],
        };
        let lens = [3, 3];
        let mut tree = Tree::iterative(2);
        let mut costs = Vec::new();
        loop {
            costs.push(preemptions(&p.run(&mut tree), &lens));
            if tree.progress().done {
                break;
            }
        }
        let single = p.explore(2).0.len() as u64;
        let progress = tree.progress();
        assert_eq!(
            progress.pass_executions, single,
            "the last pass is the whole search"
        );
        assert_eq!(progress.executions, costs.len() as u64);
        assert_eq!((progress.bound, progress.target), (2, 2));
        // the first pass has no preemption; the first run with two comes after every run
        // with at most one of the pass before
        let first_two = costs.iter().position(|&c| c == 2).unwrap();
        let pass0 = p.explore(0).0.len();
        let pass1 = p.explore(1).0.len();
        assert!(costs[..pass0].iter().all(|&c| c == 0));
        assert!(first_two >= pass0 + pass1);
    }

    #[test]
    fn steps_touching_nothing_shared_depend_on_nothing() {
        for quiet in [Access::Start, Access::Local] {
            for other in [
                Access::Read(1),
                Access::Write(1),
                Access::Lock(1),
                Access::Write2(1, 2),
                Access::Opaque,
                Access::Start,
                Access::Local,
            ] {
                assert!(!dependent(quiet, other), "{quiet:?} {other:?}");
                assert!(!dependent(other, quiet), "{other:?} {quiet:?}");
            }
        }
        assert!(dependent(Access::Lock(1), Access::Lock(1)));
        assert!(!dependent(Access::Lock(1), Access::Lock(2)));
    }

    #[test]
    fn a_release_orders_the_next_acquire_without_racing_with_it() {
        let release = Access::Write2(5, 1);
        assert!(dependent(release, Access::Lock(1)));
        assert!(!reversible(release, Access::Lock(1)));
        assert!(reversible(Access::Lock(1), Access::Lock(1)));
        assert!(reversible(release, Access::Read(5)));
        assert!(!dependent(release, Access::Lock(2)));
    }

    #[test]
    fn a_step_reading_one_key_and_writing_another_depends_as_both() {
        let rw = Access::ReadWrite(1, 2);
        assert!(!dependent(rw, Access::Read(1)));
        assert!(dependent(rw, Access::Write(1)));
        assert!(dependent(rw, Access::Read(2)));
        assert!(!dependent(rw, Access::ReadWrite(1, 3)));
        assert!(dependent(rw, Access::ReadWrite(2, 3)));
        assert!(!dependent(rw, Access::Write(3)));
        assert!(dependent(Access::Write(2), rw));
    }

    #[test]
    fn a_step_writing_two_keys_depends_on_either() {
        let two = Access::Write2(1, 2);
        assert!(dependent(two, Access::Read(1)));
        assert!(dependent(Access::Read(2), two));
        assert!(!dependent(two, Access::Read(3)));
        assert!(dependent(two, Access::Opaque));
        assert!(dependent(two, Access::Write2(3, 2)));
        assert!(!dependent(two, Access::Write2(3, 4)));
    }

    #[test]
    fn independent_threads_take_one_execution() {
        let p = Program {
            threads: vec![
                vec![Access::Write(1), Access::Read(1), Access::Write(1)],
                vec![Access::Write(2), Access::Read(2), Access::Write(2)],
            ],
        };
        let (runs, progress) = p.explore(10);
        assert_eq!(runs.len(), 1, "{runs:?}");
        assert!(progress.done);
        assert!(progress.pruned > 0);
        assert_eq!(progress.redundant, 0);
    }

    #[test]
    fn the_reduction_keeps_every_outcome() {
        // Reads see how many writes came before: every distinct outcome of the full set of
        // interleavings must show up in the reduced exploration.
        let r = Access::Read;
        let w = Access::Write;
        let programs = vec![
            vec![vec![r(1), w(1)], vec![r(1), w(1)]],
            vec![vec![r(1), w(2), r(2)], vec![r(2), w(1), r(3)]],
            vec![
                vec![w(1), r(2), w(3)],
                vec![r(3), w(2), r(1)],
                vec![r(1), r(3)],
            ],
            vec![vec![r(1), Access::Opaque, w(1)], vec![w(2), r(1), w(1)]],
        ];
        for threads in programs {
            let p = Program { threads };
            let lens: Vec<usize> = p.threads.iter().map(Vec::len).collect();
            let full: BTreeSet<_> = all_orders(&lens).iter().map(|o| p.outcome(o)).collect();
            let (runs, progress) = p.explore(10);
            let got: BTreeSet<_> = runs.iter().map(|o| p.outcome(o)).collect();
            assert_eq!(got, full);
            assert!(progress.done);
            assert!(runs.len() <= all_orders(&lens).len());
        }
    }

    #[test]
    fn a_lost_update_is_reached_within_one_preemption() {
        let p = Program {
            threads: vec![vec![Access::Read(1), Access::Write(1)]; 2],
        };
        let (runs, _) = p.explore(1);
        let at = |o: &Vec<(u32, usize)>, x| o.iter().position(|&y| y == x).unwrap();
        let lost = runs.iter().any(|o| {
            let last_read = at(o, (0, 0)).max(at(o, (1, 0)));
            last_read < at(o, (0, 1)).min(at(o, (1, 1)))
        });
        assert!(lost);
    }

    #[test]
    fn the_first_decisions_subtrees_run_in_turn() {
        // six read-modify-writes of one key a thread: the subtree of either first thread is
        // most of the search; the other thread's first execution comes second, not after it
        let mut steps = Vec::new();
        for _ in 0..6 {
            steps.extend([Access::Read(1), Access::Write(1)]);
        }
        let p = Program {
            threads: vec![steps; 2],
        };
        let (runs, progress) = p.explore(2);
        assert!(progress.done && runs.len() > 20);
        let first = |o: &Vec<(u32, usize)>| o[0].0;
        assert_eq!(first(&runs[0]), 0);
        assert_eq!(first(&runs[1]), 1);
        let later = runs
            .iter()
            .skip(2)
            .take(10)
            .filter(|o| first(o) == 1)
            .count();
        assert!(
            (4..=6).contains(&later),
            "{later} of the next ten start with thread 1"
        );
        let mut distinct = runs.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), runs.len());
    }

    #[test]
    fn a_prefix_that_cannot_be_followed_is_counted() {
        let mut tree = Tree::new(2);
        let at = |t: u32| (t as usize, 0);
        let op = |_, _| Access::Opaque;
        // Execution 1: threads 0 and 1 at every step, two steps.
        assert_eq!(tree.choose(0, &[0, 1], None, &at, &op), 0);
        assert_eq!(tree.choose(1, &[0, 1], Some(0), &at, &op), 0);
        assert_eq!(tree.choose(2, &[1], None, &at, &op), 1);
        tree.end();
        // The next item wants thread 1 somewhere; this time only thread 0 can run.
        tree.choose(0, &[0], None, &at, &op);
        tree.choose(1, &[0], Some(0), &at, &op);
        tree.end();
        assert!(tree.progress().divergences >= 1);
    }

    #[test]
    fn an_execution_whose_round_was_not_exact_runs_again_from_its_prefix() {
        let p = Program {
            threads: vec![vec![Access::Write(1), Access::Write(1)]; 2],
        };
        let (want, _) = p.explore(2);
        let mut tree = Tree::new(2);
        let mut runs = Vec::new();
        let mut spoiled = 0;
        loop {
            // every other round runs free (not exact) after its second step, going off its
            // schedule: the tree runs it again and takes only the exact one
            let mut pos = [0usize; 2];
            let mut order = Vec::new();
            let mut current = None;
            let spoil = runs.len() % 2 == 1 && spoiled < runs.len();
            let classify = p.classify();
            for step in 0.. {
                let runnable: Vec<u32> = (0..2u32).filter(|&t| pos[t as usize] < 2).collect();
                if runnable.is_empty() {
                    break;
                }
                let snapshot = pos;
                let at = move |t: u32| (t as usize, snapshot[t as usize] as u32);
                let mut c = tree.choose(step, &runnable, current, &at, &classify);
                if spoil && step >= 1 {
                    c = runnable[runnable.len() - 1]; // the thread the OS ran, not the chosen
                }
                order.push((c, pos[c as usize]));
                pos[c as usize] += 1;
                current = Some(c);
            }
            if spoil {
                spoiled += 1;
                tree.not_exact();
            } else {
                runs.push(order);
            }
            tree.end();
            if tree.progress().done || runs.len() > 1000 {
                break;
            }
        }
        assert_eq!(runs, want);
        let progress = tree.progress();
        assert_eq!(progress.retried, spoiled as u64);
        assert_eq!(progress.divergences, 0);
        assert_eq!(progress.pass_executions, want.len() as u64);
    }

    #[test]
    fn fuzz_small_programs_keep_every_outcome() {
        let mut x: u64 = 12345;
        let mut next = |n: u64| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) % n
        };
        for _ in 0..3000 {
            let nt = 2 + next(2) as usize;
            let threads: Vec<Vec<Access>> = (0..nt)
                .map(|_| {
                    (0..1 + next(3))
                        .map(|_| match next(5) {
                            0 | 1 => Access::Read(next(2)),
                            2 | 3 => Access::Write(next(2)),
                            _ => Access::Opaque,
                        })
                        .collect()
                })
                .collect();
            let p = Program {
                threads: threads.clone(),
            };
            let lens: Vec<usize> = p.threads.iter().map(Vec::len).collect();
            let orders = all_orders(&lens);
            let full: BTreeSet<_> = orders.iter().map(|o| p.outcome(o)).collect();
            for bound in [10, SLEEP_SETS_FROM] {
                let (runs, _) = p.explore(bound);
                let got: BTreeSet<_> = runs.iter().map(|o| p.outcome(o)).collect();
                assert_eq!(got, full, "{threads:?} runs {runs:?}");
                assert!(runs.len() <= orders.len());
            }
        }
    }

    #[test]
    fn a_bounded_search_reaches_every_outcome_within_its_bound() {
        let mut x: u64 = 999;
        let mut next = |n: u64| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) % n
        };
        for bound in [0u32, 1, 2] {
            let (mut missed, mut total) = (0, 0);
            for _ in 0..1500 {
                let threads: Vec<Vec<Access>> = (0..2)
                    .map(|_| {
                        (0..2 + next(4))
                            .map(|_| match next(6) {
                                0 | 1 => Access::Read(next(2)),
                                2 | 3 => Access::Write(next(2)),
                                4 => Access::Opaque,
                                _ => Access::Local, // quiet steps around opaque ones
                            })
                            .collect()
                    })
                    .collect();
                let p = Program { threads };
                let lens: Vec<usize> = p.threads.iter().map(Vec::len).collect();
                let want: BTreeSet<_> = all_orders(&lens)
                    .iter()
                    .filter(|o| preemptions(o, &lens) <= bound)
                    .map(|o| p.outcome(o))
                    .collect();
                let (runs, _) = p.explore(bound);
                let got: BTreeSet<_> = runs.iter().map(|o| p.outcome(o)).collect();
                total += 1;
                if !want.is_subset(&got) {
                    missed += 1;
                }
            }
            assert_eq!(
                missed, 0,
                "bound {bound}: missed outcomes in {missed} of {total}"
            );
        }
    }

    #[test]
    fn a_tree_handed_over_as_words_goes_on_as_it_would_have() {
        let mut x: u64 = 99;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..40 {
            let threads = (0..2 + next() % 2)
                .map(|_| {
                    (0..1 + next() % 4)
                        .map(|_| match next() % 5 {
                            0 => Access::Read(next() % 2),
                            1 => Access::Write(next() % 2),
                            2 => Access::Lock(7),
                            3 => Access::Local,
                            _ => Access::Opaque,
                        })
                        .collect()
                })
                .collect();
            let program = Program { threads };
            for bound in [0, 1, 2, SLEEP_SETS_FROM] {
                let (runs, progress) = program.explore(bound);
                // the same search, the tree made again from its words after every execution
                let mut tree = Tree::iterative(bound);
                let mut handed = Vec::new();
                loop {
                    handed.push(program.run(&mut tree));
                    tree = Tree::from_words(&tree.to_words()).expect("a tree's own words");
                    if tree.progress().done || handed.len() > 100_000 {
                        break;
                    }
                }
                let mut plain = Tree::iterative(bound);
                let mut expected = Vec::new();
                loop {
                    expected.push(program.run(&mut plain));
                    if plain.progress().done || expected.len() > 100_000 {
                        break;
                    }
                }
                assert_eq!(handed, expected);
                assert_eq!(tree.progress(), plain.progress());
                assert!(!runs.is_empty() && progress.done);
            }
        }
        assert!(Tree::from_words(&[]).is_none());
        let mut words = Tree::iterative(2).to_words();
        words.push(0);
        assert!(Tree::from_words(&words).is_none());
    }
}
