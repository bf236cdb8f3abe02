//! Byte-level BPE (GPT-2 style): text bytes are mapped to printable characters, then
//! adjacent symbols are merged lowest merge rank first until no merge applies.
//!
//! Merging uses a heap of candidate pairs over a linked list of symbols, so a piece of n
//! characters costs O(n log n) even when an input has no spaces at all.

use std::collections::{BinaryHeap, HashMap};

use crate::ids::TokenId;

/// The GPT-2 byte ↔ character table: printable Latin-1 bytes map to themselves, the other
/// 68 bytes (controls, space, 0x7f-0xa0, 0xad) to U+0100 onwards in byte order.
pub fn byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, 0x21..=0x7e | 0xa1..=0xac | 0xae..=0xff);
        table[b as usize] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(next).expect("U+0100..U+0143 are characters");
            next += 1;
            c
        };
    }
    table
}

/// Merge table: `(left, right) → (rank, merged)` by token id.
pub struct Merges {
    ranks: HashMap<(u32, u32), (u32, TokenId)>,
}

impl Merges {
    /// Builds the table from `"left right"` strings; merges whose parts or result are not
    /// tokens can never apply and are dropped.
    pub fn new(merges: &[String], token_id: &HashMap<String, TokenId>) -> Self {
        let mut ranks = HashMap::with_capacity(merges.len());
        for (rank, m) in merges.iter().enumerate() {
            let Some((l, r)) = m.split_once(' ') else {
                continue;
            };
            let (Some(&li), Some(&ri)) = (token_id.get(l), token_id.get(r)) else {
                continue;
            };
            let Some(&merged) = token_id.get(&format!("{l}{r}")) else {
                continue;
            };
            ranks.entry((li.0, ri.0)).or_insert((rank as u32, merged));
        }
        Self { ranks }
    }

    fn get(&self, l: TokenId, r: TokenId) -> Option<(u32, TokenId)> {
        self.ranks.get(&(l.0, r.0)).copied()
    }
}

#[derive(PartialEq, Eq)]
struct Candidate {
    rank: u32,
    left: usize,
    /// Token ids of the pair when it was queued (stale if either side merged since).
    l: TokenId,
    r: TokenId,
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Max-heap: lowest rank first, then leftmost.
        other.rank.cmp(&self.rank).then(other.left.cmp(&self.left))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Merges the symbols of one piece (given as token ids of its characters) and appends
/// the resulting tokens to `out`.
pub fn merge(symbols: &[TokenId], merges: &Merges, out: &mut Vec<TokenId>) {
    let n = symbols.len();
    let mut tok: Vec<TokenId> = symbols.to_vec();
    let mut alive = vec![true; n];
    let mut next: Vec<usize> = (1..=n).collect();
    let mut prev: Vec<Option<usize>> = (0..n).map(|i| i.checked_sub(1)).collect();
    let mut heap = BinaryHeap::new();
    let push = |heap: &mut BinaryHeap<Candidate>, left: usize, l: TokenId, r: TokenId| {
        if let Some((rank, _)) = merges.get(l, r) {
            heap.push(Candidate { rank, left, l, r });
        }
    };
    for i in 0..n.saturating_sub(1) {
        push(&mut heap, i, tok[i], tok[i + 1]);
    }
    while let Some(c) = heap.pop() {
        let right = next[c.left];
        // Skip candidates made stale by an earlier merge on either side.
        if !alive[c.left] || right >= n || !alive[right] || tok[c.left] != c.l || tok[right] != c.r
        {
            continue;
        }
        let (_, merged) = merges.get(c.l, c.r).expect("queued pairs are merges");
        tok[c.left] = merged;
        alive[right] = false;
        next[c.left] = next[right];
        if next[right] < n {
            prev[next[right]] = Some(c.left);
        }
        if let Some(p) = prev[c.left] {
            push(&mut heap, p, tok[p], merged);
        }
        if next[c.left] < n {
            push(&mut heap, c.left, merged, tok[next[c.left]]);
        }
    }
    let mut i = 0;
    while i < n {
        out.push(tok[i]);
        i = next[i];
    }
}
