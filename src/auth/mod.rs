//! Authentication: password hashing, access/refresh tokens, Google ID tokens, input rules and the
//! lockout rule ([`lockout`]).

pub mod google;
pub mod lockout;
pub mod passwords;
pub mod session_cache;
pub mod tokens;

use std::collections::HashSet;
use std::sync::LazyLock;

use crate::error::FieldError;

pub const USERNAME_MIN: usize = 3;
pub const USERNAME_MAX: usize = 30;
pub const PASSWORD_MIN: usize = 8;
pub const PASSWORD_MAX: usize = 128;
/// RFC 5321's limit on a forward path.
pub const EMAIL_MAX: usize = 254;
pub const FULL_NAME_MAX: usize = 100;
pub const AVATAR_URL_MAX: usize = 2048;

pub fn check_username(field: &str, username: &str, errors: &mut Vec<FieldError>) {
    let len = username.chars().count();
    if !(USERNAME_MIN..=USERNAME_MAX).contains(&len) {
        errors.push(FieldError::new(
            field,
            "length",
            format!("Username must be {USERNAME_MIN}-{USERNAME_MAX} characters"),
        ));
    } else if !username
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        errors.push(FieldError::new(
            field,
            "pattern",
            "Username may contain only letters, digits, '_' and '-'",
        ));
    }
}

pub fn check_email(field: &str, email: &str, errors: &mut Vec<FieldError>) {
    if !is_plausible_email(email) {
        errors.push(FieldError::new(
            field,
            "email",
            "Not a valid e-mail address",
        ));
    }
}

/// A deliberately simple check: one '@', a non-empty local part, a dotted domain, no spaces.
fn is_plausible_email(email: &str) -> bool {
    if email.len() > EMAIL_MAX || email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return false;
    }
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains("..")
}

/// The most common breached passwords, lower-cased, one a line: Django 5.2's list (20,000
/// passwords compiled by Royce Williams from breach corpora; BSD-3-Clause, see
/// `common-passwords.LICENSE` beside it), keeping only the entries of [`PASSWORD_MIN`] or more
/// characters, since shorter ones are refused by length anyway.
static COMMON_PASSWORDS: LazyLock<HashSet<&'static str>> = LazyLock::new(|| {
    include_str!("common-passwords.txt")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect()
});

/// Whether `password` is on the common breached passwords list, compared case-insensitively
/// and ignoring surrounding whitespace (`Password1`, `Passw0rd` and `Qwerty123` are).
pub fn is_common_password(password: &str) -> bool {
    COMMON_PASSWORDS.contains(password.trim().to_lowercase().as_str())
}

/// The password rules of register, password change and `user create`: [`PASSWORD_MIN`]-
/// [`PASSWORD_MAX`] characters (`length`), lower + upper case letters and a digit
/// (`weak_password`), and not one of the most common breached passwords (`common_password`).
pub fn check_password(field: &str, password: &str, errors: &mut Vec<FieldError>) {
    let len = password.chars().count();
    if !(PASSWORD_MIN..=PASSWORD_MAX).contains(&len) {
        errors.push(FieldError::new(
            field,
            "length",
            format!("Password must be {PASSWORD_MIN}-{PASSWORD_MAX} characters"),
        ));
        return;
    }
    let lower = password.chars().any(|c| c.is_lowercase());
    let upper = password.chars().any(|c| c.is_uppercase());
    let digit = password.chars().any(|c| c.is_ascii_digit());
    if !(lower && upper && digit) {
        errors.push(FieldError::new(
            field,
            "weak_password",
            "Password must contain a lower-case letter, an upper-case letter and a digit",
        ));
    } else if is_common_password(password) {
        errors.push(FieldError::new(
            field,
            "common_password",
            "Password is one of the most common breached passwords; choose another",
        ));
    }
}

pub fn check_optional_len(
    field: &str,
    value: Option<&str>,
    max: usize,
    errors: &mut Vec<FieldError>,
) {
    if value.is_some_and(|v| v.chars().count() > max) {
        errors.push(FieldError::new(
            field,
            "length",
            format!("Must be at most {max} characters"),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errs(f: impl Fn(&mut Vec<FieldError>)) -> Vec<String> {
        let mut e = Vec::new();
        f(&mut e);
        e.iter().map(|e| e.code.to_string()).collect()
    }

    #[test]
    fn usernames() {
        assert!(errs(|e| check_username("u", "dev_user-1", e)).is_empty());
        assert_eq!(errs(|e| check_username("u", "ab", e)), ["length"]);
        assert_eq!(
            errs(|e| check_username("u", &"a".repeat(31), e)),
            ["length"]
        );
        assert_eq!(errs(|e| check_username("u", "bad name", e)), ["pattern"]);
        assert_eq!(errs(|e| check_username("u", "émile", e)), ["pattern"]);
    }

    #[test]
    fn emails() {
        for ok in ["a@b.co", "first.last+tag@sub.example.org"] {
            assert!(errs(|e| check_email("e", ok, e)).is_empty(), "{ok}");
        }
        for bad in [
            "", "plain", "a@b", "@b.co", "a@@b.co", "a b@c.de", "a@.co", "a@b..co", "a@b.co.",
        ] {
            assert_eq!(errs(|e| check_email("e", bad, e)), ["email"], "{bad}");
        }
    }

    #[test]
    fn passwords() {
        assert!(errs(|e| check_password("p", "Pocket-Dev-7319", e)).is_empty());
        for common in [
            "Password1",
            "Passw0rd",
            "Qwerty123",
            "Secret123",
            " pASSWORD1 ",
        ] {
            assert_eq!(
                errs(|e| check_password("p", common, e)),
                ["common_password"],
                "{common}"
            );
        }
        assert!(COMMON_PASSWORDS.len() > 8000, "the list is loaded");
        assert!(
            COMMON_PASSWORDS
                .iter()
                .all(|p| p.chars().count() >= PASSWORD_MIN)
        );
        assert_eq!(errs(|e| check_password("p", "Sh0rt", e)), ["length"]);
        assert_eq!(
            errs(|e| check_password("p", "alllowercase1", e)),
            ["weak_password"]
        );
        assert_eq!(
            errs(|e| check_password("p", "NoDigitsHere", e)),
            ["weak_password"]
        );
        assert_eq!(
            errs(|e| check_password("p", &format!("Aa1{}", "x".repeat(126)), e)),
            ["length"]
        );
    }
}
