//! Small crate-private helpers shared by several layers.

/// The reason given for a share that is not a fraction in `range` (`"(0, 1]"` or
/// `"[0, 1]"`): every share in seawall is a fraction, and a whole number from 2 to 100, which
/// reads as a percentage (other libraries take percentages), gets a hint.
pub(crate) fn not_a_fraction(value: f64, range: &str) -> String {
    if (2.0..=100.0).contains(&value) && value.fract() == 0.0 {
        format!(
            "{value} is not a fraction in {range}; for {value} % write {}",
            value / 100.0
        )
    } else {
        format!("{value} is not a fraction in {range}")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn percentages_get_a_hint() {
        assert_eq!(
            super::not_a_fraction(50.0, "(0, 1]"),
            "50 is not a fraction in (0, 1]; for 50 % write 0.5"
        );
        assert_eq!(
            super::not_a_fraction(1.5, "(0, 1]"),
            "1.5 is not a fraction in (0, 1]"
        );
        assert_eq!(
            super::not_a_fraction(-1.0, "[0, 1]"),
            "-1 is not a fraction in [0, 1]"
        );
    }
}
