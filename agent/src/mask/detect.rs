//! Content detectors: find sensitive values (emails, card numbers, IBANs, ...) inside any text.
//!
//! Owns the built-in detectors ([`Builtin`]), custom regular expressions, and [`Detectors`], the
//! compiled set a rule file enables. Scanning works on raw bytes (no UTF-8 validation, no
//! decoding of JSON or composites): a value inside a JSON string or a `(a,b)` row is found in
//! place. Never decides what to replace a finding with (that is [`engine`](super::engine)'s
//! job) and never allocates when nothing is found: findings are appended to a caller's `Vec`,
//! which a caller reuses from row to row.
//!
//! Performance: this runs on every text cell of every result. One pass over the value counts
//! digits, `@`, `.`, `:` and uppercase letters ([`Profile`]), and each detector is skipped when
//! the profile rules it out (no `@`: no email; fewer than 13 digits: no card). The built-in
//! detectors are hand-written byte scanners; only API-key shapes and custom detectors use
//! `regex`, whose literal prefilters make a miss cheap.
//!
//! Invariants: a finding is a non-empty byte range inside the value, and only it is
//! replaced, so built-in findings never contain `"`, `\`, `,`, parentheses, braces or control
//! bytes (a phone number with a parenthesised area code is found as its runs outside the
//! parentheses; custom findings may hold them, and the engine then masks the whole value);
//! punctuation around a value (quotes, brackets, parentheses, commas) never stops it being
//! found. Checks are strict where a false positive would be costly
//! (Luhn for cards, mod-97 and the country's length for IBANs, SSN invalid ranges, parsing by
//! `std::net` for addresses, a decoded JSON header for JWTs), and every match needs a token
//! boundary on both sides, so `x4111111111111111` or a digit run inside a longer one is no card.
use std::net::{Ipv4Addr, Ipv6Addr};

use regex::bytes::Regex;
use thiserror::Error;

/// Why a detector could not be compiled.
#[derive(Debug, Clone, Error)]
pub enum DetectError {
    #[error("detector {name:?} has an invalid regular expression")]
    BadRegex {
        name: String,
        #[source]
        source: regex::Error,
    },
    #[error("detector {name:?} has a regular expression that matches the empty string")]
    MatchesEmpty { name: String },
    #[error("unknown detector {name:?}; built-in detectors are {known}")]
    Unknown { name: String, known: String },
}

/// The built-in detectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Builtin {
    Email,
    Card,
    Iban,
    UsSsn,
    Phone,
    Ipv4,
    Ipv6,
    Jwt,
    ApiKey,
}

impl Builtin {
    pub const ALL: [Builtin; 9] = [
        Builtin::Email,
        Builtin::Card,
        Builtin::Iban,
        Builtin::UsSsn,
        Builtin::Phone,
        Builtin::Ipv4,
        Builtin::Ipv6,
        Builtin::Jwt,
        Builtin::ApiKey,
    ];

    /// The name used in rule files.
    pub fn name(self) -> &'static str {
        match self {
            Builtin::Email => "email",
            Builtin::Card => "card",
            Builtin::Iban => "iban",
            Builtin::UsSsn => "us_ssn",
            Builtin::Phone => "phone",
            Builtin::Ipv4 => "ipv4",
            Builtin::Ipv6 => "ipv6",
            Builtin::Jwt => "jwt",
            Builtin::ApiKey => "api_key",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|b| b.name() == name)
    }

    /// The built-in detector called `name`, or an error listing the known names.
    pub fn parse(name: &str) -> Result<Self, DetectError> {
        Self::from_name(name).ok_or_else(|| DetectError::Unknown {
            name: name.to_string(),
            known: Self::ALL.map(Builtin::name).join(", "),
        })
    }
}

/// Index of a detector in its [`Detectors`] set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DetectorId(pub u16);

/// One sensitive value found in a text: bytes `start..end` of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finding {
    pub start: usize,
    pub end: usize,
    pub detector: DetectorId,
}

#[derive(Debug, Clone)]
enum Kind {
    Builtin(Builtin),
    Custom(Regex),
}

/// A compiled set of detectors, each with a name and an id (its index).
#[derive(Debug, Clone, Default)]
pub struct Detectors {
    list: Vec<(Box<str>, Kind)>,
    api_keys: Option<Regex>,
}

impl Detectors {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Adds a built-in detector.
    pub fn push_builtin(&mut self, builtin: Builtin) -> DetectorId {
        if builtin == Builtin::ApiKey && self.api_keys.is_none() {
            self.api_keys = api_key_regex();
        }
        self.push(builtin.name().into(), Kind::Builtin(builtin))
    }

    /// Adds a custom detector; a pattern that does not compile or matches the empty string is
    /// refused.
    pub fn push_custom(&mut self, name: &str, pattern: &str) -> Result<DetectorId, DetectError> {
        let re = Regex::new(pattern).map_err(|source| DetectError::BadRegex {
            name: name.to_string(),
            source,
        })?;
        if re.is_match(b"") {
            return Err(DetectError::MatchesEmpty {
                name: name.to_string(),
            });
        }
        Ok(self.push(name.into(), Kind::Custom(re)))
    }

    fn push(&mut self, name: Box<str>, kind: Kind) -> DetectorId {
        let id = DetectorId(u16::try_from(self.list.len()).unwrap_or(u16::MAX));
        self.list.push((name, kind));
        id
    }

    /// The name of detector `id` ("" for an id from another set).
    pub fn name(&self, id: DetectorId) -> &str {
        self.list
            .get(usize::from(id.0))
            .map_or("", |(name, _)| name)
    }

    /// Appends to `out` the findings of the detectors in `enabled` in `text`, sorted by start
    /// (then longest first). Findings of different detectors may overlap.
    pub fn scan(&self, text: &[u8], enabled: &[DetectorId], out: &mut Vec<Finding>) {
        if text.is_empty() || enabled.is_empty() {
            return;
        }
        let first = out.len();
        let profile = Profile::of(text);
        for &id in enabled {
            let Some((_, kind)) = self.list.get(usize::from(id.0)) else {
                continue;
            };
            let mut emit = |start: usize, end: usize| {
                out.push(Finding {
                    start,
                    end,
                    detector: id,
                })
            };
            match kind {
                Kind::Builtin(Builtin::ApiKey) => {
                    if let Some(re) = &self.api_keys {
                        api_keys(re, text, &profile, &mut emit)
                    }
                }
                Kind::Builtin(b) => builtin(*b, text, &profile, &mut emit),
                Kind::Custom(re) => {
                    for m in re.find_iter(text) {
                        if !m.is_empty() {
                            emit(m.start(), m.end());
                        }
                    }
                }
            }
        }
        if out.len() - first > 1 {
            out[first..].sort_unstable_by_key(|f| (f.start, std::cmp::Reverse(f.end)));
        }
    }
}

/// The byte ranges a built-in detector finds in `text` (for tests and tools; the engine uses
/// [`Detectors::scan`]).
pub fn find(builtin: Builtin, text: &[u8]) -> Vec<(usize, usize)> {
    let mut found = Vec::new();
    let profile = Profile::of(text);
    let mut emit = |s, e| found.push((s, e));
    if builtin == Builtin::ApiKey {
        if let Some(re) = api_key_regex() {
            api_keys(&re, text, &profile, &mut emit);
        }
    } else {
        self::builtin(builtin, text, &profile, &mut emit);
    }
    found
}

fn builtin(b: Builtin, text: &[u8], p: &Profile, emit: &mut impl FnMut(usize, usize)) {
    match b {
        Builtin::Email if p.at => email(text, emit),
        Builtin::Card if p.digits >= 13 => card(text, emit),
        Builtin::Iban if p.upper >= 2 && p.digits >= 2 && text.len() >= 15 => iban(text, emit),
        Builtin::UsSsn if p.digits >= 9 => ssn(text, emit),
        Builtin::Phone if p.digits >= 8 => phone(text, emit),
        Builtin::Ipv4 if p.digits >= 4 && p.dots >= 3 => ipv4(text, emit),
        Builtin::Ipv6 if p.colons >= 2 => ipv6(text, emit),
        Builtin::Jwt if p.dots >= 2 && text.len() >= 16 => jwt(text, emit),
        _ => {}
    }
}

/// Counts gathered in one pass to skip detectors that cannot match.
#[derive(Debug, Default)]
struct Profile {
    digits: usize,
    upper: usize,
    dots: usize,
    colons: usize,
    at: bool,
}

impl Profile {
    fn of(text: &[u8]) -> Self {
        let mut p = Profile::default();
        for &b in text {
            match b {
                b'0'..=b'9' => p.digits += 1,
                b'A'..=b'Z' => p.upper += 1,
                b'.' => p.dots += 1,
                b':' => p.colons += 1,
                b'@' => p.at = true,
                _ => {}
            }
        }
        p
    }
}

fn prev(text: &[u8], i: usize) -> Option<u8> {
    i.checked_sub(1).and_then(|j| text.get(j).copied())
}

fn alnum(b: Option<u8>) -> bool {
    b.is_some_and(|b| b.is_ascii_alphanumeric())
}

fn digit_at(text: &[u8], i: usize) -> bool {
    text.get(i).is_some_and(u8::is_ascii_digit)
}

/// Whether `text[i]` is one of `seps` followed by a digit: the number before `i` goes on.
fn continues_number(text: &[u8], i: usize, seps: &[u8]) -> bool {
    text.get(i).is_some_and(|b| seps.contains(b)) && digit_at(text, i + 1)
}

// ---------------------------------------------------------------------------------------------
// email

fn is_local(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'%' | b'+' | b'-' | b'\'')
}

fn is_domain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-')
}

/// `local@domain.tld`: the local part is RFC 5322's dot-atom in its common forms,
/// `[A-Za-z0-9._%+'-]+` (`o'brien`, `john.smith+tag`), whatever punctuation surrounds it; it
/// does not start with a dot or an apostrophe (an ellipsis, a quote: `'bob@x.io'`), but may
/// end with a dot (`taro.@example.jp`, invalid yet real). The rarer atext characters (`!#$&*/=?^`
/// and friends) are not taken: they would pull a URL's `?to=` into the finding. The domain
/// has at least two labels, none empty or starting/ending with `-`, and an alphabetic
/// top-level label of two or more letters. A trailing `.` (end of a sentence) is not part of
/// the address.
fn email(text: &[u8], emit: &mut impl FnMut(usize, usize)) {
    let mut done = 0;
    for at in 0..text.len() {
        if text[at] != b'@' || at < done {
            continue;
        }
        let mut s = at;
        while s > done && is_local(text[s - 1]) {
            s -= 1;
        }
        while s < at && matches!(text[s], b'.' | b'\'') {
            s += 1;
        }
        if s == at {
            continue;
        }
        let mut e = at + 1;
        while e < text.len() && is_domain(text[e]) {
            e += 1;
        }
        while e > at + 1 && matches!(text[e - 1], b'.' | b'-') {
            e -= 1;
        }
        if valid_domain(&text[at + 1..e]) {
            emit(s, e);
            done = e;
        }
    }
}

fn valid_domain(d: &[u8]) -> bool {
    let mut labels = 0;
    let mut last: &[u8] = &[];
    for label in d.split(|&b| b == b'.') {
        if label.is_empty() || label.len() > 63 || label[0] == b'-' || label.ends_with(b"-") {
            return false;
        }
        labels += 1;
        last = label;
    }
    labels >= 2 && last.len() >= 2 && last.iter().all(u8::is_ascii_alphabetic)
}

// ---------------------------------------------------------------------------------------------
// card

/// Luhn check over ASCII digits.
pub fn luhn_valid(digits: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, &d) in digits.iter().rev().enumerate() {
        let mut v = u32::from(d - b'0');
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    sum.is_multiple_of(10)
}

/// 13 to 19 digits passing Luhn, not starting with 0, either contiguous or in groups separated
/// by one space or dash (every group but the last has at least 3 digits). Candidates are whole runs
/// or run prefixes ending at a group boundary; a run inside a longer alphanumeric token, a
/// decimal fraction, or a `+` phone number is not a candidate.
fn card(text: &[u8], emit: &mut impl FnMut(usize, usize)) {
    let n = text.len();
    let mut i = 0;
    while i < n {
        if !text[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let start = i;
        let before_ok =
            !alnum(prev(text, start)) && !matches!(prev(text, start), Some(b'+' | b'.'));
        let mut digits = [0u8; 19];
        let mut count = 0usize;
        // (end byte offset, digits so far, groups before it all >= 3 digits) at each group end;
        // at most 19 groups matter.
        let mut ends = [(0usize, 0usize, false); 19];
        let mut groups = 0usize;
        let mut shape_ok = true;
        let mut j = i;
        loop {
            let g = j;
            while j < n && text[j].is_ascii_digit() {
                if count < 19 {
                    digits[count] = text[j];
                }
                count += 1;
                j += 1;
            }
            let glen = j - g;
            if groups < ends.len() {
                ends[groups] = (j, count, shape_ok);
            }
            groups += 1;
            let more = j + 1 < n && matches!(text[j], b' ' | b'-') && text[j + 1].is_ascii_digit();
            if !more {
                break;
            }
            if glen < 3 {
                shape_ok = false;
            }
            j += 1;
        }
        i = j;
        let after = text.get(j).copied();
        let after_ok = !alnum(after) && !continues_number(text, j, b".");
        if !before_ok || digits[0] == b'0' {
            continue;
        }
        for &(end, c, shape) in ends[..groups.min(ends.len())].iter().rev() {
            if !shape || !(13..=19).contains(&c) || (end == j && !after_ok) {
                continue;
            }
            if luhn_valid(&digits[..c]) {
                emit(start, end);
                break;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// iban

/// IBAN length by country code (ISO 13616 registry, the countries in common use).
const IBAN_LENGTHS: &[(&[u8; 2], usize)] = &[
    (b"AD", 24),
    (b"AE", 23),
    (b"AL", 28),
    (b"AT", 20),
    (b"AZ", 28),
    (b"BA", 20),
    (b"BE", 16),
    (b"BG", 22),
    (b"BH", 22),
    (b"BR", 29),
    (b"BY", 28),
    (b"CH", 21),
    (b"CR", 22),
    (b"CY", 28),
    (b"CZ", 24),
    (b"DE", 22),
    (b"DK", 18),
    (b"DO", 28),
    (b"EE", 20),
    (b"EG", 29),
    (b"ES", 24),
    (b"FI", 18),
    (b"FO", 18),
    (b"FR", 27),
    (b"GB", 22),
    (b"GE", 22),
    (b"GI", 23),
    (b"GL", 18),
    (b"GR", 27),
    (b"GT", 28),
    (b"HR", 21),
    (b"HU", 28),
    (b"IE", 22),
    (b"IL", 23),
    (b"IQ", 23),
    (b"IS", 26),
    (b"IT", 27),
    (b"JO", 30),
    (b"KW", 30),
    (b"KZ", 20),
    (b"LB", 28),
    (b"LC", 32),
    (b"LI", 21),
    (b"LT", 20),
    (b"LU", 20),
    (b"LV", 21),
    (b"MC", 27),
    (b"MD", 24),
    (b"ME", 22),
    (b"MK", 19),
    (b"MR", 27),
    (b"MT", 31),
    (b"MU", 30),
    (b"NL", 18),
    (b"NO", 15),
    (b"PK", 24),
    (b"PL", 28),
    (b"PS", 29),
    (b"PT", 25),
    (b"QA", 29),
    (b"RO", 24),
    (b"RS", 22),
    (b"SA", 24),
    (b"SC", 31),
    (b"SE", 24),
    (b"SI", 19),
    (b"SK", 24),
    (b"SM", 27),
    (b"TL", 23),
    (b"TN", 24),
    (b"TR", 26),
    (b"UA", 29),
    (b"VA", 22),
    (b"VG", 24),
    (b"XK", 20),
];

/// The IBAN length of a country, if the country is in [`IBAN_LENGTHS`].
pub fn iban_length(country: &[u8]) -> Option<usize> {
    IBAN_LENGTHS
        .iter()
        .find(|(c, _)| c.as_slice() == country)
        .map(|&(_, len)| len)
}

/// ISO 7064 mod-97-10 over an IBAN's uppercase letters and digits (country and check digits
/// first, as written): true when the remainder is 1.
pub fn iban_checksum_valid(iban: &[u8]) -> bool {
    if iban.len() < 5 {
        return false;
    }
    let mut rem = 0u32;
    for &b in iban[4..].iter().chain(&iban[..4]) {
        rem = match b {
            b'0'..=b'9' => (rem * 10 + u32::from(b - b'0')) % 97,
            b'A'..=b'Z' => (rem * 100 + u32::from(b - b'A' + 10)) % 97,
            _ => return false,
        };
    }
    rem == 1
}

/// Country code of [`IBAN_LENGTHS`], two check digits, then uppercase letters and digits up to
/// the country's length, optionally printed in groups of four separated by one space; mod-97
/// must hold.
fn iban(text: &[u8], emit: &mut impl FnMut(usize, usize)) {
    let n = text.len();
    let mut i = 0;
    while i + 4 <= n {
        let is_start = text[i].is_ascii_uppercase()
            && text[i + 1].is_ascii_uppercase()
            && text[i + 2].is_ascii_digit()
            && text[i + 3].is_ascii_digit()
            && !alnum(prev(text, i));
        let Some(len) = is_start.then(|| iban_length(&text[i..i + 2])).flatten() else {
            i += 1;
            continue;
        };
        let mut buf = [0u8; 34];
        let mut count = 0;
        let mut j = i;
        while count < len && j < n {
            let c = text[j];
            if c.is_ascii_uppercase() || c.is_ascii_digit() {
                buf[count] = c;
                count += 1;
                j += 1;
            } else if c == b' '
                && count % 4 == 0
                && text
                    .get(j + 1)
                    .is_some_and(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
            {
                j += 1;
            } else {
                break;
            }
        }
        if count == len && !alnum(text.get(j).copied()) && iban_checksum_valid(&buf[..len]) {
            emit(i, j);
            i = j;
        } else {
            i += 1;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// us_ssn

/// Whether area-group-serial is a possible SSN: area not 000, 666 or 900-999; group not 00;
/// serial not 0000.
pub fn ssn_valid(area: u16, group: u16, serial: u16) -> bool {
    area != 0 && area != 666 && area < 900 && group != 0 && serial != 0
}

fn num(d: &[u8]) -> u16 {
    d.iter()
        .fold(0u16, |acc, &b| acc * 10 + u16::from(b - b'0'))
}

/// `AAA-GG-SSSS` or `AAA GG SSSS` (one separator, used twice) with a valid area, group and
/// serial. Nine contiguous digits are not matched: too many ordinary numbers look like that.
fn ssn(text: &[u8], emit: &mut impl FnMut(usize, usize)) {
    let n = text.len();
    let mut i = 0;
    while i + 11 <= n {
        let w = &text[i..i + 11];
        let sep = w[3];
        let shape = matches!(sep, b'-' | b' ')
            && w[6] == sep
            && w[..3].iter().all(u8::is_ascii_digit)
            && w[4..6].iter().all(u8::is_ascii_digit)
            && w[7..].iter().all(u8::is_ascii_digit);
        let bounded = !alnum(prev(text, i))
            && !matches!(prev(text, i), Some(b'-' | b'.' | b'+'))
            && !alnum(text.get(i + 11).copied())
            && !continues_number(text, i + 11, b"-.");
        if shape && bounded && ssn_valid(num(&w[..3]), num(&w[4..6]), num(&w[7..])) {
            emit(i, i + 11);
            i += 11;
        } else {
            i += 1;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// phone

fn is_phone_sep(b: u8) -> bool {
    matches!(b, b' ' | b'-' | b'.')
}

/// Phone numbers in three shapes, chosen to keep false positives (plain integers, dates,
/// times, versions, addresses) out:
/// - international: `+` then 8 to 15 digits, first not 0, optionally grouped by single
///   spaces, dashes, dots or `(...)`;
/// - North American: `(415) 555-2671`, `415-555-2671`, `415.555.2671`, `415 555 2671`,
///   optionally after `1-`/`1 `: groups of 3, 3 and 4 digits with separators, area code and
///   exchange not starting with 0 or 1;
/// - national with a trunk 0: `020 7946 0958`, `06 12 34 56 78`: 10 or 11 digits in two or
///   more groups of 2 to 8, all separated by the same character.
fn phone(text: &[u8], emit: &mut impl FnMut(usize, usize)) {
    let n = text.len();
    let mut i = 0;
    while i < n {
        let c = text[i];
        let can_start = c == b'+' || c == b'(' || c.is_ascii_digit();
        // Any punctuation may come before a number but what would make it part of another
        // token: a sign, a decimal, a date or version (`-`, `.`, `/`), a time (`:`, except
        // before `+`: `tel:+1...`), an address or identifier (`@`, `_`).
        let p = prev(text, i);
        let before_ok = !alnum(p)
            && !matches!(p, Some(b'+' | b'.' | b'-' | b'/' | b'@' | b'_'))
            && (c == b'+' || p != Some(b':'));
        if !can_start || !before_ok {
            i += 1;
            continue;
        }
        // A failed attempt reads at most 25 bytes, so retrying at the next byte stays linear.
        match phone_at(text, i) {
            (end, true) => {
                emit_outside_parentheses(text, i, end, emit);
                i = end;
            }
            (_, false) => i += 1,
        }
    }
}

/// Emits the phone number at `s..e` as the runs of it outside parentheses, trimmed to digits
/// (and a leading `+`): `(415) 555-2671` is `415` and `555-2671`, `+49 (0)30 1234567` is `+49`,
/// `0` and `30 1234567`. A finding never holds a parenthesis, so it is replaced in place even
/// in a composite value; the parentheses stay around the masks.
fn emit_outside_parentheses(text: &[u8], s: usize, e: usize, emit: &mut impl FnMut(usize, usize)) {
    let mut from = s;
    for k in s..=e {
        if k < e && !matches!(text[k], b'(' | b')') {
            continue;
        }
        let (mut a, mut b) = (from, k);
        while a < b && !(text[a].is_ascii_digit() || text[a] == b'+') {
            a += 1;
        }
        while b > a && !text[b - 1].is_ascii_digit() {
            b -= 1;
        }
        if a < b {
            emit(a, b);
        }
        from = k + 1;
    }
}

/// Scans the phone-like run starting at `s`; returns its end and whether it is a phone number.
fn phone_at(text: &[u8], s: usize) -> (usize, bool) {
    let n = text.len();
    let plus = text[s] == b'+';
    let mut j = s + usize::from(plus);
    // Up to 8 groups of digits; `seps[k]` is the separator before group k+1.
    let mut groups = [0usize; 8];
    let mut seps = [0u8; 8];
    let mut ng = 0;
    let mut digits = 0;
    let mut first_digit = 0u8;
    let mut paren_groups = 0;
    let mut end = j;
    loop {
        if ng == groups.len() || j - s > 24 {
            return (end.max(s + 1), false);
        }
        let open = text.get(j) == Some(&b'(');
        if open {
            j += 1;
        }
        let g = j;
        while j < n && text[j].is_ascii_digit() {
            if digits == 0 {
                first_digit = text[j];
            }
            digits += 1;
            j += 1;
        }
        if j == g {
            return (end.max(s + 1), false);
        }
        groups[ng] = j - g;
        ng += 1;
        if open {
            if text.get(j) != Some(&b')') {
                return (j, false);
            }
            paren_groups += 1;
            j += 1;
        }
        end = j;
        // The next separator: one of space/dash/dot, or after `)` optionally one space.
        let sep = match text.get(j) {
            Some(&b) if is_phone_sep(b) => Some(b),
            _ if open => Some(b')'),
            _ => None,
        };
        let next = match sep {
            Some(b')') => j,
            Some(_) => j + 1,
            None => break,
        };
        let next_ok = text
            .get(next)
            .is_some_and(|b| b.is_ascii_digit() || *b == b'(');
        if !next_ok {
            break;
        }
        seps[ng - 1] = if open { b')' } else { sep.unwrap_or(b')') };
        j = next;
    }
    let after = text.get(end).copied();
    if alnum(after) || matches!(after, Some(b':' | b'/' | b'@' | b'_')) {
        return (end, false);
    }
    if continues_number(text, end, b"-.") {
        return (end, false);
    }
    let groups = &groups[..ng];
    let seps = &seps[..ng.saturating_sub(1)];
    let ok = if plus {
        (8..=15).contains(&digits) && first_digit != b'0'
    } else if first_digit == b'0' {
        (10..=11).contains(&digits)
            && ng >= 2
            && paren_groups <= 1
            && groups.iter().all(|g| (2..=8).contains(g))
            && seps.windows(2).all(|w| w[0] == w[1] || w[0] == b')')
    } else {
        let nanp = match groups {
            [3, 3, 4] => Some(0),
            [1, 3, 3, 4] if first_digit == b'1' => Some(1),
            _ => None,
        };
        nanp.is_some_and(|skip| {
            // Area code and exchange: the first digit of groups `skip` and `skip+1`.
            let mut k = s;
            let mut starts = [0u8; 4];
            let mut gi = 0;
            while k < end && gi < 4 {
                if text[k].is_ascii_digit() && !digit_at(text, k.wrapping_sub(1)) {
                    starts[gi] = text[k];
                    gi += 1;
                }
                k += 1;
            }
            let parens_ok = paren_groups == 0 || (paren_groups == 1 && skip == 0);
            let seps_ok = match (skip, seps) {
                (0, [b')', b]) => matches!(b, b' ' | b'-' | b'.') || *b == b')',
                (0, [a, b]) => a == b,
                (1, [_, a, b]) => a == b,
                _ => false,
            };
            parens_ok && seps_ok && starts[skip] >= b'2' && starts[skip + 1] >= b'2'
        })
    };
    (end, ok)
}

// ---------------------------------------------------------------------------------------------
// ipv4 / ipv6

/// Four dot-separated decimal octets (parsed by `std::net`, so `256` or `01` are refused), not
/// part of a longer dotted run (`1.2.3.4.5` is a version, not an address).
fn ipv4(text: &[u8], emit: &mut impl FnMut(usize, usize)) {
    let n = text.len();
    let mut i = 0;
    while i < n {
        if !text[i].is_ascii_digit() || alnum(prev(text, i)) || prev(text, i) == Some(b'.') {
            i += 1;
            continue;
        }
        let mut j = i;
        while j < n && (text[j].is_ascii_digit() || text[j] == b'.') && j - i <= 16 {
            j += 1;
        }
        let mut e = j;
        if text[e - 1] == b'.' {
            e -= 1;
        }
        let after_ok = !alnum(text.get(j).copied()) && (e == j || !digit_at(text, j));
        if after_ok
            && e - i <= 15
            && std::str::from_utf8(&text[i..e])
                .ok()
                .and_then(|s| s.parse::<Ipv4Addr>().ok())
                .is_some()
        {
            emit(i, e);
        }
        i = j;
    }
}

fn is_v6(b: u8) -> bool {
    b.is_ascii_hexdigit() || b == b':' || b == b'.'
}

/// A maximal run of hex digits, colons and dots with two or more colons and a hex digit that
/// `std::net` parses as an IPv6 address (a trailing `.` or single `:` is punctuation). Times
/// (`12:30:45`) and MAC addresses do not parse; `std::vector` is not a run (`d` follows a
/// letter).
fn ipv6(text: &[u8], emit: &mut impl FnMut(usize, usize)) {
    let n = text.len();
    let mut i = 0;
    while i < n {
        if !is_v6(text[i]) {
            i += 1;
            continue;
        }
        let mut j = i;
        while j < n && is_v6(text[j]) {
            j += 1;
        }
        let bounded = !alnum(prev(text, i)) && !alnum(text.get(j).copied());
        if bounded && j - i <= 45 {
            let mut e = j;
            while e > i && text[e - 1] == b'.' {
                e -= 1;
            }
            let run = &text[i..e];
            let colons = run.iter().filter(|&&b| b == b':').count();
            if colons >= 2 && run.iter().any(u8::is_ascii_hexdigit) {
                let parses = |r: &[u8]| {
                    std::str::from_utf8(r)
                        .ok()
                        .and_then(|s| s.parse::<Ipv6Addr>().ok())
                        .is_some()
                };
                if parses(run) {
                    emit(i, e);
                } else if run.ends_with(b":")
                    && !run.ends_with(b"::")
                    && parses(&run[..run.len() - 1])
                {
                    emit(i, e - 1);
                }
            }
        }
        i = j;
    }
}

// ---------------------------------------------------------------------------------------------
// jwt

fn is_b64url(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

fn b64url_value(b: u8) -> Option<u8> {
    match b {
        b'A'..=b'Z' => Some(b - b'A'),
        b'a'..=b'z' => Some(b - b'a' + 26),
        b'0'..=b'9' => Some(b - b'0' + 52),
        b'-' => Some(62),
        b'_' => Some(63),
        _ => None,
    }
}

/// Decodes unpadded base64url; `None` on a bad character or impossible length.
fn b64url_decode(s: &[u8]) -> Option<Vec<u8>> {
    if s.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for &b in s {
        acc = (acc << 6) | u32::from(b64url_value(b)?);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// A JWS (three segments) or JWE (five) in compact form: base64url segments joined by dots,
/// the first starting `eyJ` and decoding to a UTF-8 JSON object starting with `{"`. Only the
/// signature of a three-segment JWS may be empty.
fn jwt(text: &[u8], emit: &mut impl FnMut(usize, usize)) {
    let n = text.len();
    let mut i = 0;
    while i + 3 <= n {
        if &text[i..i + 3] != b"eyJ" || prev(text, i).is_some_and(|b| is_b64url(b) || b == b'.') {
            i += 1;
            continue;
        }
        let mut j = i;
        let mut lens = [0usize; 6];
        let mut segments = 0;
        loop {
            let s = j;
            while j < n && is_b64url(text[j]) {
                j += 1;
            }
            lens[segments] = j - s;
            segments += 1;
            if j < n && text[j] == b'.' && segments < lens.len() {
                j += 1;
            } else {
                break;
            }
        }
        // A dot right after the last segment ends a sentence, unless it makes an unsecured
        // three-segment JWS (`header.payload.`).
        if segments > 3 && lens[segments - 1] == 0 {
            segments -= 1;
            j -= 1;
        }
        let header_end = i + lens[0];
        let well_formed = (segments == 3 || segments == 5)
            && lens[..segments - 1].iter().all(|&l| l > 0)
            && (segments == 3 || lens[segments - 1] > 0);
        let header_ok = well_formed
            && b64url_decode(&text[i..header_end]).is_some_and(|h| {
                let t = h.trim_ascii();
                t.starts_with(b"{\"") && t.ends_with(b"}") && std::str::from_utf8(t).is_ok()
            });
        if header_ok {
            emit(i, j);
            i = j;
        } else {
            i += 3;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// api_key

fn api_key_regex() -> Option<Regex> {
    // (?-u): ASCII word boundaries, byte semantics; faster and enough for these shapes.
    Regex::new(concat!(
        r"(?-u)\b(?:",
        r"(?:AKIA|ASIA)[0-9A-Z]{16}",
        r"|gh[pousr]_[A-Za-z0-9]{36,255}",
        r"|github_pat_[A-Za-z0-9_]{22,255}",
        r"|xox[baprs]-[A-Za-z0-9-]{10,250}",
        r"|[sr]k_live_[A-Za-z0-9]{16,247}",
        r"|sk-[A-Za-z0-9_-]{20,250}",
        r")\b"
    ))
    .ok()
}

/// AWS access key ids (`AKIA`/`ASIA` + 16), GitHub tokens (`ghp_`... and `github_pat_`), Slack
/// tokens (`xoxb-`...), Stripe live keys (`sk_live_`, `rk_live_`) and `sk-` keys (OpenAI,
/// Anthropic style; these need two digits and an uppercase letter so that slugs like
/// `sk-some-long-article-title` are not keys).
fn api_keys(re: &Regex, text: &[u8], p: &Profile, emit: &mut impl FnMut(usize, usize)) {
    if text.len() < 20 || p.upper + p.digits == 0 {
        return;
    }
    for m in re.find_iter(text) {
        let k = m.as_bytes();
        if k.starts_with(b"sk-") {
            let digits = k.iter().filter(|b| b.is_ascii_digit()).count();
            if digits < 2 || !k.iter().any(u8::is_ascii_uppercase) {
                continue;
            }
        }
        emit(m.start(), m.end());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn found(b: Builtin, text: &str) -> Vec<&str> {
        find(b, text.as_bytes())
            .into_iter()
            .map(|(s, e)| &text[s..e])
            .collect()
    }

    fn none(b: Builtin, text: &str) {
        assert_eq!(found(b, text), Vec::<&str>::new(), "{text:?}");
    }

    // --- email

    #[test]
    fn emails_are_found_in_prose_json_and_composites() {
        assert_eq!(
            found(Builtin::Email, "mail john.smith+x@mail.example.co.uk."),
            ["john.smith+x@mail.example.co.uk"]
        );
        assert_eq!(
            found(Builtin::Email, r#"{"a":"x@y.io","b":["z_1@q-r.org"]}"#),
            ["x@y.io", "z_1@q-r.org"]
        );
        assert_eq!(found(Builtin::Email, "(1,a@b.de,t)"), ["a@b.de"]);
    }

    #[test]
    fn email_local_parts_keep_apostrophes_plus_signs_and_dots() {
        for t in [
            "o'brien@example.com",
            "d'arcy.o'neil@example.co.uk",
            "john.smith+tag@example.org",
            "a.b.c@example.io",
            "taro.@example.jp",
        ] {
            assert_eq!(found(Builtin::Email, &format!("to: {t}; ok")), [t]);
        }
        // Quotes and ellipses around an address are not part of it.
        assert_eq!(
            found(Builtin::Email, "email='o'brien@example.com'"),
            ["o'brien@example.com"]
        );
        assert_eq!(
            found(Builtin::Email, "...bob@example.com"),
            ["bob@example.com"]
        );
        assert_eq!(
            found(Builtin::Email, "(bob@example.com)"),
            ["bob@example.com"]
        );
    }

    #[test]
    fn things_with_an_at_sign_that_are_not_emails_are_not_found() {
        for t in [
            "@home",
            "a@b",
            "user@localhost",
            "a@b.c",
            "x@-a.com",
            "a@b..com",
            "a@1.23",
            "@@",
        ] {
            none(Builtin::Email, t);
        }
    }

    // --- card

    #[test]
    fn card_numbers_are_found_with_or_without_separators() {
        for t in [
            "4111111111111111",
            "4111 1111 1111 1111",
            "4111-1111-1111-1111",
            "3782 822463 10005",
            "5555555555554444",
            "6011000990139424",
        ] {
            assert_eq!(found(Builtin::Card, &format!("card: {t}, ok")), [t]);
        }
    }

    #[test]
    fn card_numbers_failing_luhn_or_in_longer_tokens_are_not_found() {
        for t in [
            "4111111111111112",
            "4111 1111 1111 1112",
            "x4111111111111111",
            "4111111111111111x",
            "41111111111111111111111",
            "0000000000000000",
            "3.4111111111111111",
            "+4111111111111111",
            "4 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1",
            "2024-01-15 12345",
        ] {
            none(Builtin::Card, t);
        }
    }

    #[test]
    fn a_card_followed_by_more_digit_groups_is_still_found() {
        assert_eq!(
            found(Builtin::Card, "4111 1111 1111 1111 123"),
            ["4111 1111 1111 1111"]
        );
    }

    // --- iban

    #[test]
    fn ibans_are_found_compact_and_grouped() {
        for t in [
            "DE89370400440532013000",
            "DE89 3704 0044 0532 0130 00",
            "GB82WEST12345698765432",
            "GB82 WEST 1234 5698 7654 32",
            "FR1420041010050500013M02606",
            "NL91ABNA0417164300",
            "NO9386011117947",
            "BE68539007547034",
        ] {
            assert_eq!(found(Builtin::Iban, &format!("iban {t}.")), [t]);
        }
    }

    #[test]
    fn ibans_failing_mod97_or_with_the_wrong_length_are_not_found() {
        for t in [
            "DE89370400440532013001",
            "DE8937040044053201300",
            "DE893704004405320130000",
            "XX89370400440532013000",
            "de89370400440532013000",
            "DE89 37040 04405 32013 000",
            "ADE89370400440532013000",
        ] {
            none(Builtin::Iban, t);
        }
    }

    // --- ssn

    #[test]
    fn ssns_are_found_with_dashes_or_spaces() {
        assert_eq!(found(Builtin::UsSsn, "ssn 123-45-6789;"), ["123-45-6789"]);
        assert_eq!(found(Builtin::UsSsn, "ssn 123 45 6789"), ["123 45 6789"]);
        assert_eq!(
            found(Builtin::UsSsn, r#"{"ssn":"078-05-1120"}"#),
            ["078-05-1120"]
        );
    }

    #[test]
    fn ssns_in_invalid_ranges_or_shapes_are_not_found() {
        for t in [
            "000-12-3456",
            "666-12-3456",
            "900-12-3456",
            "999-12-3456",
            "123-00-4567",
            "123-45-0000",
            "123456789",
            "123-45 6789",
            "1123-45-6789",
            "123-45-67890",
            "555-123-45-6789",
            "a123-45-6789",
        ] {
            none(Builtin::UsSsn, t);
        }
    }

    // --- phone

    #[test]
    fn phone_numbers_are_found_in_common_formats() {
        for t in [
            "+14155552671",
            "+1 415 555 2671",
            "+44 20 7946 0958",
            "415-555-2671",
            "415.555.2671",
            "1-415-555-2671",
            "020 7946 0958",
            "06 12 34 56 78",
        ] {
            assert_eq!(found(Builtin::Phone, &format!("call {t} now")), [t], "{t}");
        }
    }

    #[test]
    fn a_phone_number_with_parentheses_is_found_as_its_digits_without_them() {
        assert_eq!(
            found(Builtin::Phone, "call (415) 555-2671 now"),
            ["415", "555-2671"]
        );
        assert_eq!(
            found(Builtin::Phone, "call +49 (0)30 1234567 now"),
            ["+49", "0", "30 1234567"]
        );
        assert_eq!(
            found(Builtin::Phone, "call +1 (415) 555-2671"),
            ["+1", "415", "555-2671"]
        );
    }

    #[test]
    fn a_phone_number_is_found_whatever_punctuation_surrounds_it() {
        for (text, phone) in [
            ("Bob (+44 20 7946 0958) called", "+44 20 7946 0958"),
            ("Bob (415-555-2671), Ann", "415-555-2671"),
            ("[415.555.2671]", "415.555.2671"),
            ("'+14155552671'", "+14155552671"),
            ("tel:+14155552671", "+14155552671"),
            ("(1,020 7946 0958)", "020 7946 0958"),
            ("<06 12 34 56 78>", "06 12 34 56 78"),
        ] {
            assert_eq!(found(Builtin::Phone, text), [phone], "{text}");
        }
    }

    #[test]
    fn integers_dates_times_versions_and_addresses_are_not_phone_numbers() {
        for t in [
            "12345678",
            "4155552671",
            "2024-01-15",
            "2024-01-15 12:30:45",
            "15.01.2024",
            "1.2.3.4",
            "192.168.100.200",
            "+123",
            "123-45-6789",
            "4111 1111 1111 1111",
            "115-555-2671",
            "415-155-2671",
            "v415-555-2671",
            "415-555-2671x",
            "06 12 34",
            "01.02.2023 12:30",
            "3.14159",
        ] {
            none(Builtin::Phone, t);
        }
    }

    // --- ip

    #[test]
    fn ipv4_addresses_are_found() {
        assert_eq!(
            found(Builtin::Ipv4, "from 10.0.0.1:5432 and 192.168.1.254."),
            ["10.0.0.1", "192.168.1.254"]
        );
    }

    #[test]
    fn versions_and_out_of_range_octets_are_not_ipv4() {
        for t in [
            "1.2.3.4.5",
            "256.1.1.1",
            "1.2.3",
            "v1.2.3.4",
            "01.2.3.4",
            "1.2.3.4a",
        ] {
            none(Builtin::Ipv4, t);
        }
    }

    #[test]
    fn ipv6_addresses_are_found() {
        assert_eq!(
            found(
                Builtin::Ipv6,
                "at [2001:db8::1]:80 and fe80::1ff:fe23:4567:890a, ::1"
            ),
            ["2001:db8::1", "fe80::1ff:fe23:4567:890a", "::1"]
        );
        assert_eq!(found(Builtin::Ipv6, "::ffff:10.0.0.1"), ["::ffff:10.0.0.1"]);
    }

    #[test]
    fn times_macs_and_paths_are_not_ipv6() {
        for t in [
            "12:30:45",
            "00:1a:2b:3c:4d:5e",
            "std::vector",
            "::",
            "a:b:c",
            "1::2::3",
        ] {
            none(Builtin::Ipv6, t);
        }
    }

    // --- jwt

    const JWT: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U";

    #[test]
    fn jwts_are_found() {
        assert_eq!(found(Builtin::Jwt, &format!("Bearer {JWT}")), [JWT]);
        assert_eq!(found(Builtin::Jwt, &format!(r#"{{"t":"{JWT}"}}"#)), [JWT]);
    }

    #[test]
    fn dotted_base64_that_is_not_a_jwt_is_not_found() {
        for t in [
            "eyJhbGciOiJIUzI1NiJ9.payload",
            "eyJub3Rqc29u.eyJ4IjoxfQ.sig",
            "xeyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxIn0.sig",
            "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9..sig",
        ] {
            none(Builtin::Jwt, t);
        }
    }

    // --- api keys

    #[test]
    fn api_keys_are_found() {
        for t in [
            "AKIAIOSFODNN7EXAMPLE",
            "ghp_1234567890abcdefghijABCDEFGHIJ123456",
            "xoxb-123456789012-abcdefABCDEF",
            "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
            "sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8t",
        ] {
            assert_eq!(found(Builtin::ApiKey, &format!("key={t} end")), [t]);
        }
    }

    #[test]
    fn key_like_words_are_not_api_keys() {
        for t in [
            "AKIAIOSFODNN7EXAMPL",
            "XAKIAIOSFODNN7EXAMPLE",
            "ghp_short",
            "sk-some-long-article-title-here",
            "task-0123456789abcdefghijklmn",
        ] {
            none(Builtin::ApiKey, &format!("value {t} here"));
        }
    }

    // --- set

    #[test]
    fn a_custom_detector_finds_its_regex_and_refuses_bad_or_empty_patterns() {
        let mut d = Detectors::new();
        let id = d.push_custom("employee", r"EMP-[0-9]{6}").unwrap();
        let mut out = Vec::new();
        d.scan(b"by EMP-123456 and EMP-12", &[id], &mut out);
        assert_eq!(
            out,
            [Finding {
                start: 3,
                end: 13,
                detector: id
            }]
        );
        assert!(matches!(
            d.push_custom("bad", "(unclosed"),
            Err(DetectError::BadRegex { .. })
        ));
        assert!(matches!(
            d.push_custom("empty", "x*"),
            Err(DetectError::MatchesEmpty { .. })
        ));
    }

    #[test]
    fn scanning_text_without_findings_does_not_allocate() {
        let mut d = Detectors::new();
        let ids: Vec<_> = Builtin::ALL
            .into_iter()
            .map(|b| d.push_builtin(b))
            .collect();
        let mut out = Vec::new();
        d.scan(
            b"just some ordinary text, 42 items at 3.50 each",
            &ids,
            &mut out,
        );
        assert!(out.is_empty());
        assert_eq!(out.capacity(), 0);
    }

    #[test]
    fn findings_of_several_detectors_come_sorted_by_start() {
        let mut d = Detectors::new();
        let ids: Vec<_> = Builtin::ALL
            .into_iter()
            .map(|b| d.push_builtin(b))
            .collect();
        let mut out = Vec::new();
        d.scan(
            b"ssn 123-45-6789 mail a@b.io card 4111111111111111",
            &ids,
            &mut out,
        );
        let names: Vec<_> = out.iter().map(|f| d.name(f.detector)).collect();
        assert_eq!(names, ["us_ssn", "email", "card"]);
    }

    #[test]
    fn unknown_detector_names_list_the_known_ones() {
        let e = Builtin::parse("emial").unwrap_err().to_string();
        assert!(
            e.contains("\"emial\"") && e.contains("email, card, iban"),
            "{e}"
        );
    }

    // --- properties

    /// A card number with a real prefix, `len` digits and a valid Luhn check digit.
    fn card_digits() -> impl Strategy<Value = Vec<u8>> {
        (
            prop::sample::select(vec![
                &b"4"[..],
                b"51",
                b"55",
                b"2221",
                b"34",
                b"37",
                b"6011",
                b"35",
            ]),
            13usize..=19,
            prop::collection::vec(0u8..10, 19),
        )
            .prop_map(|(prefix, len, fill)| {
                let mut d: Vec<u8> = prefix.to_vec();
                d.extend(fill.iter().map(|x| b'0' + x).take(len - 1 - prefix.len()));
                for check in b'0'..=b'9' {
                    d.push(check);
                    if luhn_valid(&d) {
                        break;
                    }
                    d.pop();
                }
                d
            })
    }

    /// Groups the digits as 4-4-4-... (or 4-6-rest), separators chosen per boundary.
    fn with_separators(d: &[u8], amex: bool, seps: &[u8]) -> String {
        let sizes: Vec<usize> = if amex { vec![4, 6, 9] } else { vec![4; 5] };
        let mut out = String::new();
        let mut at = 0;
        for (k, size) in sizes.into_iter().enumerate() {
            if at >= d.len() {
                break;
            }
            if at > 0 {
                match seps[k % seps.len()] {
                    0 => {}
                    1 => out.push(' '),
                    _ => out.push('-'),
                }
            }
            let end = (at + size).min(d.len());
            out.push_str(std::str::from_utf8(&d[at..end]).unwrap());
            at = end;
        }
        out
    }

    fn prose() -> impl Strategy<Value = String> {
        "[a-z ,;:!?]{0,12}".prop_map(|s| s)
    }

    proptest! {
        #[test]
        fn generated_valid_cards_with_random_separators_are_always_found(
            d in card_digits(), amex in any::<bool>(), seps in prop::collection::vec(0u8..3, 5),
            pre in prose(), post in prose(),
        ) {
            let card = with_separators(&d, amex, &seps);
            let text = format!("{pre} {card} {post}");
            prop_assert_eq!(found(Builtin::Card, &text), vec![card.as_str()]);
        }

        #[test]
        fn a_single_digit_change_breaking_luhn_is_never_a_card(
            d in card_digits(), pos in any::<prop::sample::Index>(), delta in 1u8..10,
            seps in prop::collection::vec(0u8..3, 5),
        ) {
            let mut d = d;
            let i = pos.index(d.len());
            d[i] = b'0' + (d[i] - b'0' + delta) % 10;
            prop_assume!(d[0] != b'0');
            prop_assert!(!luhn_valid(&d));
            let text = with_separators(&d, false, &seps);
            // The changed number is never found; a finding can only be a shorter prefix that
            // is itself a valid card number (`4111 1111 1111 1111 12` finds the first 16).
            for hit in found(Builtin::Card, &text) {
                let digits: Vec<u8> = hit.bytes().filter(u8::is_ascii_digit).collect();
                prop_assert!(digits.len() < d.len() && luhn_valid(&digits), "{} in {}", hit, text);
            }
        }

        #[test]
        fn generated_valid_ibans_are_always_found(
            country in prop::sample::select(IBAN_LENGTHS.to_vec()),
            bban in prop::collection::vec(prop::sample::select(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ".to_vec()), 30),
            grouped in any::<bool>(),
        ) {
            let (cc, len) = country;
            let bban = &bban[..len - 4];
            let mut raw: Vec<u8> = cc.to_vec();
            raw.extend(b"00");
            raw.extend(bban);
            // Check digits: 98 - (number with check "00") mod 97.
            let mut rem = 0u32;
            for &b in raw[4..].iter().chain(&raw[..4]) {
                rem = match b {
                    b'0'..=b'9' => (rem * 10 + u32::from(b - b'0')) % 97,
                    _ => (rem * 100 + u32::from(b - b'A' + 10)) % 97,
                };
            }
            let check = 98 - rem;
            raw[2] = b'0' + (check / 10) as u8;
            raw[3] = b'0' + (check % 10) as u8;
            prop_assert!(iban_checksum_valid(&raw));
            let iban = if grouped {
                raw.chunks(4).map(|c| std::str::from_utf8(c).unwrap()).collect::<Vec<_>>().join(" ")
            } else {
                String::from_utf8(raw.clone()).unwrap()
            };
            let text = format!("pay to {iban}, thanks");
            prop_assert_eq!(found(Builtin::Iban, &text), vec![iban.as_str()]);
            // Changing one character of the BBAN breaks mod-97.
            let mut bad = raw.clone();
            let last = bad.len() - 1;
            bad[last] = match bad[last] {
                b'9' => b'0',
                b'Z' => b'Y',
                c => c + 1,
            };
            prop_assert!(!iban_checksum_valid(&bad));
        }

        #[test]
        fn ssns_are_found_exactly_when_their_ranges_are_valid(
            area in 0u16..1000, group in 0u16..100, serial in 0u16..10000, dash in any::<bool>(),
        ) {
            let sep = if dash { '-' } else { ' ' };
            let t = format!("id {area:03}{sep}{group:02}{sep}{serial:04}.");
            let hit = !found(Builtin::UsSsn, &t).is_empty();
            prop_assert_eq!(hit, ssn_valid(area, group, serial), "{}", t);
        }

        #[test]
        fn emails_are_found_whole(
            local in "[a-z0-9]{1,8}([._+-][a-z0-9]{1,8}){0,2}",
            domain in "[a-z0-9]{1,10}(-[a-z0-9]{1,5})?(\\.[a-z0-9]{1,8}){0,2}",
            tld in "[a-z]{2,6}", pre in prose(),
        ) {
            let email = format!("{local}@{domain}.{tld}");
            let text = format!("{pre} <{email}>; ");
            prop_assert_eq!(found(Builtin::Email, &text), vec![email.as_str()]);
        }

        #[test]
        fn any_ipv4_address_is_found(a in any::<[u8; 4]>(), pre in prose()) {
            let ip = std::net::Ipv4Addr::from(a).to_string();
            let text = format!("{pre} {ip}:22");
            prop_assert_eq!(found(Builtin::Ipv4, &text), vec![ip.as_str()]);
        }

        #[test]
        fn any_ipv6_address_is_found(a in any::<[u16; 8]>(), pre in "[g-z ,;!?]{0,12}") {
            let ip = std::net::Ipv6Addr::from(a).to_string();
            prop_assume!(ip.bytes().any(|b| b.is_ascii_hexdigit()));
            let text = format!("{pre} [{ip}]");
            prop_assert_eq!(found(Builtin::Ipv6, &text), vec![ip.as_str()]);
        }

        #[test]
        fn nanp_phone_numbers_are_found(
            area in 200u16..1000, exch in 200u16..1000, line in 0u16..10000,
            style in 0usize..5,
        ) {
            let p = match style {
                0 => format!("({area}) {exch}-{line:04}"),
                1 => format!("{area}-{exch}-{line:04}"),
                2 => format!("{area}.{exch}.{line:04}"),
                3 => format!("1-{area}-{exch}-{line:04}"),
                _ => format!("+1 {area} {exch} {line:04}"),
            };
            let text = format!("tel: {p}, ext");
            if style == 0 {
                let (a, rest) = (area.to_string(), format!("{exch}-{line:04}"));
                prop_assert_eq!(found(Builtin::Phone, &text), vec![a.as_str(), rest.as_str()]);
            } else {
                prop_assert_eq!(found(Builtin::Phone, &text), vec![p.as_str()]);
            }
        }

        #[test]
        fn a_phone_number_in_any_punctuation_is_found_alone(
            area in 200u16..1000, exch in 200u16..1000, line in 0u16..10000, style in 0usize..5,
            open in prop::sample::select(b"([{<'\" ,;!".to_vec()),
            close in prop::sample::select(b")]}>'\" ,;!?.".to_vec()),
            pre in prose(),
        ) {
            let p = match style {
                0 => format!("{area}-{exch}-{line:04}"),
                1 => format!("{area}.{exch}.{line:04}"),
                2 => format!("1-{area}-{exch}-{line:04}"),
                3 => format!("+44 {area} {exch} {line:04}"),
                _ => format!("0{area} {exch} {line:04}"),
            };
            let text = format!("{pre} {}{p}{} x", open as char, close as char);
            prop_assert_eq!(found(Builtin::Phone, &text), vec![p.as_str()]);
        }

        #[test]
        fn built_in_findings_never_hold_structural_or_control_bytes(
            text in prop::collection::vec(
                prop::sample::select(b"0123456789 +-.()@,'\"{}\\\n\tabAZ:_/".to_vec()), 0..120),
        ) {
            for b in Builtin::ALL {
                for (s, e) in find(b, &text) {
                    let f = &text[s..e];
                    prop_assert!(
                        !f.iter().any(|&c| c < 0x20 || b"\"\\,(){}".contains(&c)),
                        "{} found {:?} in {:?}", b.name(), String::from_utf8_lossy(f),
                        String::from_utf8_lossy(&text)
                    );
                }
            }
        }

        #[test]
        fn emails_with_apostrophes_and_plus_tags_are_found_whole_in_quotes(
            first in "[a-z]{1,6}", last in "[a-z]{1,8}", tag in "[a-z0-9]{0,5}",
            domain in "[a-z]{1,10}", tld in "[a-z]{2,4}",
            quote in prop::sample::select(b"'\"<([ ".to_vec()),
        ) {
            let plus = if tag.is_empty() { String::new() } else { format!("+{tag}") };
            let email = format!("{first}'{last}.x{plus}@{domain}.{tld}");
            let text = format!("mail {}{email}{} now", quote as char, quote as char);
            prop_assert_eq!(found(Builtin::Email, &text), vec![email.as_str()]);
        }

        #[test]
        fn plain_integers_and_iso_dates_are_never_phone_numbers(
            n in any::<u64>(), y in 1900u16..2100, m in 1u8..13, d in 1u8..29,
        ) {
            for t in [format!("n={n}"), format!("{y}-{m:02}-{d:02}"), format!("{d:02}.{m:02}.{y} 12:30")] {
                let hits = found(Builtin::Phone, &t);
                prop_assert!(hits.is_empty(), "{:?} in {:?}", hits, t);
            }
        }

        #[test]
        fn aws_key_ids_are_found_and_one_char_short_are_not(k in "[0-9A-Z]{16}") {
            let key = format!("AKIA{k}");
            let text = format!("id {key} x");
            prop_assert_eq!(found(Builtin::ApiKey, &text), vec![key.as_str()]);
            let short = format!("id {} x", &key[..19]);
            let hits = found(Builtin::ApiKey, &short);
            prop_assert!(hits.is_empty());
        }

        #[test]
        fn scanning_arbitrary_bytes_never_panics_and_findings_are_in_bounds(
            text in prop::collection::vec(any::<u8>(), 0..200),
        ) {
            let mut d = Detectors::new();
            let ids: Vec<_> = Builtin::ALL.into_iter().map(|b| d.push_builtin(b)).collect();
            let mut out = Vec::new();
            d.scan(&text, &ids, &mut out);
            for f in out {
                prop_assert!(f.start < f.end && f.end <= text.len());
            }
        }
    }
}
