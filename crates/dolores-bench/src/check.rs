//! What one listener checks about what it receives: only messages of its own tracks
//! (else a *misroute*), each once (else a *duplicate*), in each publisher's order
//! (else *reordered*), and at the end, everything that was published to its tracks
//! (else *loss*).
//!
//! Every publisher numbers its messages per track (`i`) and overall (`g`), and waits
//! for each answer before it sends the next, so a listener expects, per (track,
//! publisher), `i` = 0, 1, 2, … and, per publisher, growing `g`. A jump leaves a *hole*
//! that a late arrival may fill (reordered) or that stays (loss); anything at or below
//! what was seen and not in a hole is a duplicate. Memory: a counter per (track,
//! publisher) and the holes, which are normally none.

use super::wire::Payload;

/// A gap `start..end` in what a (track, publisher) slot received.
#[derive(Debug, Clone, Copy)]
struct Hole {
    slot: usize,
    start: u64,
    end: u64,
}

/// Counts of what a listener received.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Counts {
    /// Every benchmark message received, duplicates and misroutes included.
    pub(super) received: u64,
    /// Distinct expected messages received.
    pub(super) unique: u64,
    /// Messages received again.
    pub(super) duplicates: u64,
    /// Messages of a track the listener is not on, or not benchmark messages.
    pub(super) misroutes: u64,
    /// Messages that came after a later message of the same publisher.
    pub(super) reordered: u64,
    /// Reset events.
    pub(super) resets: u64,
}

impl Counts {
    /// Adds `other` in.
    pub(super) fn add(&mut self, other: &Counts) {
        self.received += other.received;
        self.unique += other.unique;
        self.duplicates += other.duplicates;
        self.misroutes += other.misroutes;
        self.reordered += other.reordered;
        self.resets += other.resets;
    }
}

/// One listener's bookkeeping.
#[derive(Debug)]
pub(super) struct Checker {
    tracks: Vec<u32>,
    publishers: usize,
    /// Next expected `i` per slot (`track position * publishers + publisher`).
    next: Vec<u64>,
    holes: Vec<Hole>,
    /// Per publisher, 1 + the highest `g` seen (0: none yet).
    top_g: Vec<u64>,
    /// What came in.
    pub(super) counts: Counts,
}

impl Checker {
    /// A listener on `tracks` (indices) of a run with `publishers` publishers.
    pub(super) fn new(tracks: Vec<u32>, publishers: usize) -> Self {
        let slots = tracks.len() * publishers;
        Self {
            tracks,
            publishers,
            next: vec![0; slots],
            holes: Vec::new(),
            top_g: vec![0; publishers],
            counts: Counts::default(),
        }
    }

    /// Something that is not a benchmark message of this run.
    pub(super) fn garbled(&mut self) {
        self.counts.received += 1;
        self.counts.misroutes += 1;
    }

    /// A reset event.
    pub(super) fn reset(&mut self) {
        self.counts.resets += 1;
    }

    /// A message; `track_ok` says whether the name the envelope carried (if any)
    /// matches the payload's track. Returns whether it was new and expected (whose
    /// latency then counts).
    pub(super) fn message(&mut self, payload: Payload, track_ok: bool) -> bool {
        self.counts.received += 1;
        let publisher = payload.p as usize;
        let position = self.tracks.iter().position(|&t| t == payload.t);
        let (Some(position), true, true) = (position, publisher < self.publishers, track_ok) else {
            self.counts.misroutes += 1;
            return false;
        };
        let slot = position * self.publishers + publisher;
        let next = self.next[slot];
        let i = payload.i;
        let new = if i == next {
            self.next[slot] = i + 1;
            true
        } else if i > next {
            self.holes.push(Hole {
                slot,
                start: next,
                end: i,
            });
            self.next[slot] = i + 1;
            true
        } else if self.fill(slot, i) {
            self.counts.reordered += 1;
            self.counts.unique += 1;
            self.note_g(publisher, payload.g);
            return true;
        } else {
            false
        };
        if !new {
            self.counts.duplicates += 1;
            return false;
        }
        self.counts.unique += 1;
        if payload.g < self.top_g[publisher].saturating_sub(1) {
            self.counts.reordered += 1;
        }
        self.note_g(publisher, payload.g);
        true
    }

    fn note_g(&mut self, publisher: usize, g: u64) {
        self.top_g[publisher] = self.top_g[publisher].max(g + 1);
    }

    /// Takes `i` out of a hole of `slot`; whether it was in one.
    fn fill(&mut self, slot: usize, i: u64) -> bool {
        let Some(at) = self
            .holes
            .iter()
            .position(|h| h.slot == slot && h.start <= i && i < h.end)
        else {
            return false;
        };
        let hole = self.holes[at];
        self.holes.swap_remove(at);
        if hole.start < i {
            self.holes.push(Hole { end: i, ..hole });
        }
        if i + 1 < hole.end {
            self.holes.push(Hole {
                start: i + 1,
                ..hole
            });
        }
        true
    }

    /// Messages this listener should have had and did not: `published[p][t]` is how
    /// many messages publisher `p` got stored on track `t`.
    pub(super) fn loss(&self, published: &[Vec<u64>]) -> u64 {
        let mut loss = 0;
        for (position, &track) in self.tracks.iter().enumerate() {
            for (publisher, per_track) in published.iter().enumerate().take(self.publishers) {
                let slot = position * self.publishers + publisher;
                let missing: u64 = self
                    .holes
                    .iter()
                    .filter(|h| h.slot == slot)
                    .map(|h| h.end - h.start)
                    .sum();
                let got = self.next[slot] - missing;
                let expected = per_track.get(track as usize).copied().unwrap_or(0);
                loss += expected.saturating_sub(got);
            }
        }
        loss
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(p: u32, g: u64, t: u32, i: u64) -> Payload {
        Payload { s: 0, p, g, t, i }
    }

    #[test]
    fn in_order_deliveries_are_all_new_and_nothing_is_lost() {
        let mut c = Checker::new(vec![0, 2], 2);
        assert!(c.message(payload(0, 0, 0, 0), true));
        assert!(c.message(payload(1, 0, 2, 0), true));
        assert!(c.message(payload(0, 2, 2, 0), true));
        assert!(c.message(payload(0, 3, 0, 1), true));
        // publisher 0 put 2 on track 0 and 1 on track 2, publisher 1 one on track 2
        let published = vec![vec![2, 0, 1], vec![0, 0, 1]];
        assert_eq!(c.loss(&published), 0);
        assert_eq!(
            c.counts,
            Counts {
                received: 4,
                unique: 4,
                ..Counts::default()
            }
        );
    }

    #[test]
    fn gaps_duplicates_misroutes_and_late_arrivals_are_told_apart() {
        let mut c = Checker::new(vec![1], 1);
        assert!(c.message(payload(0, 0, 1, 0), true));
        assert!(c.message(payload(0, 3, 1, 3), true)); // 1 and 2 missing so far
        assert!(!c.message(payload(0, 3, 1, 3), true)); // duplicate
        assert!(!c.message(payload(0, 0, 1, 0), true)); // duplicate
        assert!(c.message(payload(0, 1, 1, 1), true)); // late: reordered
        assert!(!c.message(payload(0, 1, 1, 1), true)); // and now a duplicate
        assert!(!c.message(payload(0, 4, 0, 0), true)); // another track: misroute
        assert!(!c.message(payload(7, 4, 1, 0), true)); // unknown publisher
        assert!(!c.message(payload(0, 5, 1, 4), false)); // envelope named another track
        c.garbled();
        assert_eq!(c.loss(&[vec![0, 5]]), 2); // 2 and 4 never came
        assert_eq!(
            c.counts,
            Counts {
                received: 10,
                unique: 3,
                duplicates: 3,
                misroutes: 4,
                reordered: 1,
                resets: 0,
            }
        );
    }

    #[test]
    fn order_is_checked_across_tracks_per_publisher() {
        let mut c = Checker::new(vec![0, 1], 1);
        assert!(c.message(payload(0, 1, 1, 0), true));
        assert!(c.message(payload(0, 0, 0, 0), true)); // new, but after g=1
        assert_eq!(c.counts.reordered, 1);
        assert_eq!(c.loss(&[vec![1, 1]]), 0);
    }
}
