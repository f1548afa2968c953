//! The ordered lock of a coordinated resource ([`crate::Warden::sequential`]):
//! what callers take when a decision carries `caps.sequential`. First come,
//! first served, across every process sharing the backend. Every place in the
//! line is leased: a waiter renews its place each time it looks (a short
//! lease, so a waiter that died leaves the line within it), the holder holds
//! for its own lease — a holder that never releases frees the lock when it
//! runs out. Decided here once (`lua/upstream.lua` mirrors it).

use crate::clock::Micros;

/// A resource's line: `(holder id, lease end)`, first in line first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Line {
    /// The places, in order.
    pub places: Vec<(u128, Micros)>,
}

impl Line {
    /// `id` joins the line at `now` (or, already in it, renews its place):
    /// every place whose lease ran out is dropped first. Returns its
    /// position: 0 means it holds the lock (leased for `hold`); a waiter's
    /// place is leased for `wait`.
    pub fn enter(&mut self, id: u128, now: Micros, hold: Micros, wait: Micros) -> usize {
        self.places.retain(|&(_, until)| until > now);
        let at = match self.places.iter().position(|&(p, _)| p == id) {
            Some(i) => i,
            None => {
                self.places.push((id, 0));
                self.places.len() - 1
            }
        };
        self.places[at].1 = now + if at == 0 { hold } else { wait };
        at
    }

    /// `id` leaves the line (releasing the lock if it held it); whether it
    /// was in it.
    pub fn leave(&mut self, id: u128) -> bool {
        let before = self.places.len();
        self.places.retain(|&(p, _)| p != id);
        self.places.len() != before
    }

    /// Until when anything in it matters.
    #[must_use]
    pub fn expires(&self) -> Micros {
        self.places.iter().map(|&(_, u)| u).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_come_first_served_and_the_dead_drop_out() {
        let mut l = Line::default();
        assert_eq!(l.enter(1, 0, 100, 10), 0);
        assert_eq!(l.enter(2, 1, 100, 10), 1);
        assert_eq!(l.enter(3, 2, 100, 10), 2);
        // 2 stops looking (it died): at 12 its place is gone, 3 moves up.
        assert_eq!(l.enter(3, 12, 100, 10), 1);
        assert!(l.leave(1));
        assert_eq!(l.enter(3, 13, 100, 10), 0);
        // A holder that never releases frees the lock when its lease ends.
        assert_eq!(l.enter(4, 14, 100, 10), 1);
        assert_eq!(l.enter(4, 113, 100, 10), 0);
        assert!(!l.leave(3));
    }
}
