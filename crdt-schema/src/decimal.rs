//! Exact decimal numbers for prices and amounts, kept as their canonical text.
//!
//! mesh never computes with a decimal, it only keeps one exactly, so a decimal is its
//! canonical text: an optional `-`, the integer digits without leading zeros, and the
//! fraction without trailing zeros (`12.50` is `12.5`, `-0` is `0`, `1.5e2` is `150`). Two
//! decimals are equal when their texts are.

use std::fmt;

/// Most significant digits a decimal may have (as many as a 128-bit integer holds).
pub const DECIMAL_DIGITS_MAX: usize = 38;
/// Largest exponent a decimal's text may give (`1e40` is refused: nobody prices in it).
const EXPONENT_MAX: i64 = 40;

/// An exact decimal number in canonical text form.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Decimal(String);

/// Why a text is not a decimal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{text}` is not a decimal number: {problem}")]
pub struct DecimalError {
    text: String,
    problem: &'static str,
}

impl Decimal {
    /// Reads a decimal written as digits with an optional sign, point and exponent
    /// (`12.50`, `-3`, `.5`, `1.5e2`), exactly.
    pub fn parse(text: &str) -> Result<Decimal, DecimalError> {
        let refuse = |problem| DecimalError {
            text: text.chars().take(64).collect(),
            problem,
        };
        let (negative, unsigned) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text.strip_prefix('+').unwrap_or(text)),
        };
        let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
            Some(at) => {
                let exponent: i64 = unsigned[at + 1..]
                    .parse()
                    .map_err(|_| refuse("the exponent is not an integer"))?;
                if exponent.abs() > EXPONENT_MAX {
                    return Err(refuse("the exponent is out of range"));
                }
                (&unsigned[..at], exponent)
            }
            None => (unsigned, 0),
        };
        let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        let digits_only = |part: &str| part.bytes().all(|byte| byte.is_ascii_digit());
        if whole.is_empty() && fraction.is_empty() {
            return Err(refuse("it has no digits"));
        }
        if !digits_only(whole) || !digits_only(fraction) {
            return Err(refuse(
                "use digits, one point and an optional sign and exponent",
            ));
        }
        // All digits with the point `point` places from the left, then moved by the exponent.
        let digits: String = [whole, fraction].concat();
        let point = whole.len() as i64 + exponent;
        let first = digits.find(|c| c != '0');
        let Some(first) = first else {
            return Ok(Decimal("0".into()));
        };
        let last = digits.rfind(|c| c != '0').expect("a non-zero digit exists") + 1;
        if last - first > DECIMAL_DIGITS_MAX {
            return Err(refuse("it has more than 38 significant digits"));
        }
        let significant = &digits[first..last];
        // The point's position relative to the first significant digit.
        let point = point - first as i64;
        let mut canonical = String::new();
        if negative {
            canonical.push('-');
        }
        let length = significant.len() as i64;
        if point <= 0 {
            canonical.push_str("0.");
            canonical.extend(std::iter::repeat_n('0', point.unsigned_abs() as usize));
            canonical.push_str(significant);
        } else if point >= length {
            canonical.push_str(significant);
            canonical.extend(std::iter::repeat_n('0', (point - length) as usize));
        } else {
            canonical.push_str(&significant[..point as usize]);
            canonical.push('.');
            canonical.push_str(&significant[point as usize..]);
        }
        Ok(Decimal(canonical))
    }

    /// The canonical text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The decimal an integer is.
    pub fn from_integer(value: i64) -> Decimal {
        Decimal(value.to_string())
    }

    /// The decimal a float stands for, if its shortest text has at most 15 significant
    /// digits: every decimal of 15 digits or fewer survives the trip through a float, so
    /// such a float is read as the decimal that was meant; a longer one may be a rounding.
    pub fn from_float(value: f64) -> Option<Decimal> {
        if !value.is_finite() {
            return None;
        }
        // The shortest text that reads back as the same float, as `d.ddde±x`.
        let shortest = format!("{value:e}");
        let mantissa = shortest.split('e').next().unwrap_or_default();
        let significant = mantissa.bytes().filter(u8::is_ascii_digit).count();
        (significant <= 15)
            .then(|| Decimal::parse(&shortest).ok())
            .flatten()
    }
}

impl fmt::Display for Decimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canonical(text: &str) -> String {
        Decimal::parse(text).unwrap().to_string()
    }

    #[test]
    fn equal_amounts_have_one_text() {
        assert_eq!(canonical("12.50"), "12.5");
        assert_eq!(canonical("012.500"), "12.5");
        assert_eq!(canonical("-0.0"), "0");
        assert_eq!(canonical("+7"), "7");
        assert_eq!(canonical(".5"), "0.5");
        assert_eq!(canonical("5."), "5");
        assert_eq!(canonical("1.5e2"), "150");
        assert_eq!(canonical("1e5"), "100000");
        assert_eq!(canonical("-25E-3"), "-0.025");
        assert_eq!(canonical("0.000100"), "0.0001");
        assert_eq!(canonical("100"), "100");
        assert_eq!(
            canonical("12345678901234567890.123456789012345678"),
            "12345678901234567890.123456789012345678"
        );
    }

    #[test]
    fn what_is_not_a_plain_number_is_refused_with_the_rule() {
        for text in [
            "", "-", ".", "1.2.3", "1,5", "abc", "1e", "1e400", "NaN", "inf", " 1",
        ] {
            let error = Decimal::parse(text).unwrap_err().to_string();
            assert!(error.contains("is not a decimal number"), "{text}: {error}");
        }
        let long = "1".repeat(39);
        assert!(Decimal::parse(&long).is_err());
        assert!(Decimal::parse(&format!("{long}000e-3")).is_err());
    }

    #[test]
    fn a_float_is_read_as_the_decimal_meant_unless_it_may_be_a_rounding() {
        assert_eq!(Decimal::from_float(12.5).unwrap().as_str(), "12.5");
        assert_eq!(Decimal::from_float(0.1).unwrap().as_str(), "0.1");
        assert_eq!(Decimal::from_float(-3.0).unwrap().as_str(), "-3");
        assert_eq!(
            Decimal::from_float(1e20).unwrap().as_str(),
            "100000000000000000000"
        );
        assert_eq!(Decimal::from_float(0.1 + 0.2), None, "0.30000000000000004");
        assert_eq!(Decimal::from_float(f64::NAN), None);
    }
}
