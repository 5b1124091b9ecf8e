//! The bearer token check: every request but the health probes must present the token from
//! `auth_token_file`.

use axum::extract::Request;
use axum::http::header;
use subtle::ConstantTimeEq;

/// Whether `req` carries `token` as its bearer credentials (the gateway's `authorize =
/// "token"` is this same check).
pub fn authorized(req: &Request, token: &str) -> bool {
    let Some(got) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| bearer_credentials(v.as_bytes()))
    else {
        return false;
    };
    constant_time_eq(got, token.as_bytes())
}

/// The credentials of a `Bearer` authorization, or `None` for another scheme. RFC 9110
/// (section 11.1) makes the scheme case-insensitive and allows one or more spaces after it:
/// clients that send `bearer` must not be locked out.
fn bearer_credentials(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(b"bearer".len())?;
    if !scheme.eq_ignore_ascii_case(b"bearer") || rest.first() != Some(&b' ') {
        return None;
    }
    Some(rest.trim_ascii_start())
}

/// Compares without an early exit, so response time says nothing about how much matched (the
/// length of the token is no secret worth hiding: it is a random string of a known size).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_compare() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
