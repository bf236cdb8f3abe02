//! SentencePiece BPE (the `llama` tokenizer model): spaces become U+2581, adjacent
//! characters merge highest vocabulary score first, and text no token covers falls back to
//! `<0xXX>` byte tokens.

use std::collections::{BinaryHeap, HashMap};

use crate::ids::TokenId;

#[derive(PartialEq)]
struct Bigram {
    score: f32,
    left: usize,
    /// Byte length of the pair's text when queued (stale if either side changed).
    len: usize,
}

impl Eq for Bigram {}

impl Ord for Bigram {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Max-heap: highest score first, then leftmost.
        self.score
            .total_cmp(&other.score)
            .then(other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

pub struct Spm<'a> {
    pub token_id: &'a HashMap<String, TokenId>,
    pub scores: &'a [f32],
    /// `<0xXX>` token of each byte, when the vocabulary has it.
    pub byte_tokens: &'a [Option<TokenId>; 256],
    pub unknown: Option<TokenId>,
}

impl Spm<'_> {
    /// Encodes `text` (spaces already replaced by U+2581) and appends to `out`.
    pub fn encode(&self, text: &str, out: &mut Vec<TokenId>) {
        let mut syms: Vec<Symbol> = Vec::new();
        for (i, (start, c)) in text.char_indices().enumerate() {
            syms.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: Some(i + 1),
            });
        }
        let Some(last) = syms.last_mut() else { return };
        last.next = None;

        let mut heap = BinaryHeap::new();
        // Text of each merged pair → its two halves, to re-split unknown pieces.
        let mut rev: HashMap<&str, (usize, usize)> = HashMap::new();
        let try_pair = |heap: &mut BinaryHeap<Bigram>, syms: &[Symbol], left: usize| {
            let Some(right) = syms[left].next else { return };
            let (a, b) = (syms[left], syms[right]);
            let piece = &text[a.start..b.start + b.len];
            if let Some(&id) = self.token_id.get(piece) {
                heap.push(Bigram {
                    score: self.scores.get(id.index()).copied().unwrap_or(0.0),
                    left,
                    len: piece.len(),
                });
            }
        };
        for i in 0..syms.len() {
            try_pair(&mut heap, &syms, i);
        }
        while let Some(bg) = heap.pop() {
            let left = bg.left;
            let Some(right) = syms[left].next else {
                continue;
            };
            if syms[left].len == 0
                || syms[right].len == 0
                || syms[left].len + syms[right].len != bg.len
            {
                continue;
            }
            let merged = &text[syms[left].start..syms[left].start + bg.len];
            rev.insert(merged, (syms[left].len, syms[right].len));
            syms[left].len = bg.len;
            syms[left].next = syms[right].next;
            syms[right].len = 0;
            if let Some(n) = syms[right].next {
                syms[n].prev = Some(left);
            }
            if let Some(p) = syms[left].prev {
                try_pair(&mut heap, &syms, p);
            }
            try_pair(&mut heap, &syms, left);
        }
        let mut i = Some(0);
        while let Some(at) = i {
            let s = syms[at];
            self.resegment(&text[s.start..s.start + s.len], &rev, out);
            i = s.next;
        }
    }

    fn resegment(&self, piece: &str, rev: &HashMap<&str, (usize, usize)>, out: &mut Vec<TokenId>) {
        if let Some(&id) = self.token_id.get(piece) {
            out.push(id);
            return;
        }
        if let Some(&(l, _)) = rev.get(piece) {
            self.resegment(&piece[..l], rev, out);
            self.resegment(&piece[l..], rev, out);
            return;
        }
        for b in piece.bytes() {
            if let Some(id) = self.byte_tokens[b as usize].or(self.unknown) {
                out.push(id);
            }
        }
    }
}
