//! The one reader of `key=value` words in the lines the image and the
//! tools print (`logdirty: epoch=3 dirty=12 ...`, `client: ... lost_acked=0`,
//! `doppel-hv: vendor=amd svm=1 ...`).

/// The `key=value` words of a line, in order.
pub(crate) fn pairs(line: &str) -> impl Iterator<Item = (&str, &str)> {
    line.split_whitespace().filter_map(|w| w.split_once('='))
}

/// The value of the first `key=` word of a line.
pub(crate) fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    pairs(line).find_map(|(k, v)| (k == key).then_some(v))
}

/// The first `key=` word of a line as a number (a `,` or `;` after it,
/// as in running text, is not part of it).
pub(crate) fn num(line: &str, key: &str) -> Option<u64> {
    field(line, key)?.trim_end_matches([',', ';']).parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_first_key_of_a_line() {
        let l = "logdirty: epoch=3 dirty=12, truth=12; exits=x epoch=9 a=b=c";
        assert_eq!(num(l, "epoch"), Some(3));
        assert_eq!(num(l, "dirty"), Some(12));
        assert_eq!(num(l, "truth"), Some(12));
        assert_eq!(num(l, "exits"), None, "not a number");
        assert_eq!(num(l, "missing"), None);
        assert_eq!(field(l, "a"), Some("b=c"));
        assert_eq!(field(l, "logdirty:"), None);
        // A key is a whole word's head, not a suffix of another key.
        assert_eq!(num("xepoch=4 epoch=5", "epoch"), Some(5));
        assert_eq!(
            pairs("k=v w x=").collect::<Vec<_>>(),
            [("k", "v"), ("x", "")]
        );
    }
}
