//! Redis Cluster hash slots: which slot a key lives in, a hash tag for every
//! slot, and reservation ids that carry the slot of their record.

use std::sync::OnceLock;

use crate::decision::ReservationId;

/// Number of hash slots in a Redis Cluster.
pub(super) const SLOTS: u16 = 16_384;
/// Where the record's slot sits inside a reservation id (bits 112..126).
const ID_SLOT_SHIFT: u32 = 112;

/// CRC16-XMODEM (polynomial 0x1021, initial 0), the checksum Redis Cluster uses.
pub(super) fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The slot of a hash tag (the text a key carries between `{` and `}`).
pub(super) fn tag_slot(tag: &str) -> u16 {
    crc16(tag.as_bytes()) % SLOTS
}

/// The slot of a whole key, following Redis's rule: the first `{…}` with
/// something inside is the hashed part; otherwise the whole key.
#[cfg(test)]
pub(super) fn key_slot(key: &str) -> u16 {
    if let Some(open) = key.find('{') {
        if let Some(len) = key[open + 1..].find('}') {
            if len > 0 {
                return tag_slot(&key[open + 1..open + 1 + len]);
            }
        }
    }
    tag_slot(key)
}

/// A short hash tag that hashes to `slot`, so a reservation record can share the
/// slot of the limits it holds whatever their tag is.
pub(super) fn slot_tag(slot: u16) -> &'static str {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        let mut tags = vec![String::new(); usize::from(SLOTS)];
        let mut missing = usize::from(SLOTS);
        let mut i: u32 = 0;
        while missing > 0 {
            let tag = format!("s{i:x}");
            let s = usize::from(tag_slot(&tag));
            if tags[s].is_empty() {
                tags[s] = tag;
                missing -= 1;
            }
            i += 1;
        }
        tags
    });
    &tags[usize::from(slot % SLOTS)]
}

/// `id` with its record's slot written into bits 112..126 (the rest stays random).
pub(super) fn id_in_slot(id: ReservationId, slot: u16) -> ReservationId {
    let mask = u128::from(SLOTS - 1) << ID_SLOT_SHIFT;
    ReservationId((id.0 & !mask) | (u128::from(slot % SLOTS) << ID_SLOT_SHIFT))
}

/// The slot written into `id` by [`id_in_slot`].
pub(super) fn id_slot(id: ReservationId) -> u16 {
    // Masked to 14 bits, so the cast cannot truncate.
    #[allow(clippy::cast_possible_truncation)]
    let slot = ((id.0 >> ID_SLOT_SHIFT) & u128::from(SLOTS - 1)) as u16;
    slot
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_matches_the_redis_cluster_reference() {
        // The check value of CRC16-XMODEM, and slots documented by Redis.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(key_slot("foo"), 12_182);
        assert_eq!(
            key_slot("{user1000}.following"),
            key_slot("{user1000}.followers")
        );
        assert_eq!(key_slot("foo{}{bar}"), tag_slot("foo{}{bar}"));
        assert_eq!(key_slot("foo{{bar}}zap"), tag_slot("{bar"));
    }

    #[test]
    fn every_slot_has_a_tag_and_ids_carry_their_slot() {
        for slot in [0, 1, 5_000, 12_182, SLOTS - 1] {
            assert_eq!(tag_slot(slot_tag(slot)), slot);
        }
        let id = ReservationId(u128::MAX);
        for slot in [0, 77, SLOTS - 1] {
            let moved = id_in_slot(id, slot);
            assert_eq!(id_slot(moved), slot);
            assert_eq!(
                moved.0 | (u128::from(SLOTS - 1) << ID_SLOT_SHIFT),
                u128::MAX
            );
        }
    }
}
