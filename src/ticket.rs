//! Signed tickets: short-lived JWTs a backend mints for one user, accepted wherever a token is
//! (`token=` in the first dialect, the `auth` message in the second). Verification is the
//! `jsonwebtoken` crate's, never ours: we only pick the key by algorithm and read the claims.
//!
//! - `exp` is required (with 5 s of leeway for clock skew); `nbf` is honoured when present.
//! - `sub` is the identity: it replaces the client-chosen name (1–64 characters).
//! - `rooms` lists the rooms the holder may join: names, or prefixes ending in `*`. A ticket
//!   without `rooms` may join none.
//! - `pub` (default true) false makes a read-only viewer.
//!
//! Keys: `JWT_SECRET` (HS256) and/or `JWT_PUBLIC_KEY_FILE` (an RS256 or ES256 public key in
//! PEM). A ticket signed with any other algorithm — `none` included — is refused.

use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::Secret;

/// Longest `sub`, in characters.
pub const MAX_SUB_CHARS: usize = 64;
/// Set in ticket users' sessions only: sessions the relay issues at random, and sessions a
/// client gives back, never have it.
pub const TICKET_SESSION_BIT: u128 = 1 << 127;
/// Clock skew forgiven on `exp` and `nbf`, in seconds.
const LEEWAY_SECS: u64 = 5;

/// Why tickets could not be set up (a start-up error).
#[derive(Debug, thiserror::Error)]
pub enum TicketSetupError {
    #[error("JWT_PUBLIC_KEY_FILE {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("JWT_PUBLIC_KEY_FILE {0}: not an RSA or EC (P-256) public key in PEM")]
    Key(String),
}

/// What a valid ticket grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The identity (`sub`).
    pub user: String,
    /// Room names, or prefixes (the `*` removed) in `prefixes`.
    rooms: Vec<String>,
    prefixes: Vec<String>,
    /// May publish (`pub`, default true).
    pub publish: bool,
}

impl Grant {
    /// The de-duplication session of this ticket's user: a stable 128-bit hash of `sub` (FNV-1a),
    /// the same on every node and every reconnect, so a user's retried `requestId` is caught
    /// whichever connection carries it. Its top bit is set, and no other session has it (see
    /// [`TICKET_SESSION_BIT`]), so a static-token client cannot claim a ticket user's session.
    pub fn session(&self) -> u128 {
        const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
        const PRIME: u128 = 0x0000000001000000000000000000013B;
        b"ticket:"
            .iter()
            .chain(self.user.as_bytes())
            .fold(OFFSET, |h, &b| (h ^ u128::from(b)).wrapping_mul(PRIME))
            | TICKET_SESSION_BIT
    }

    /// Whether the holder may join `room`.
    pub fn allows(&self, room: &str) -> bool {
        self.rooms.iter().any(|r| r == room) || self.prefixes.iter().any(|p| room.starts_with(p))
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    #[serde(default)]
    rooms: Vec<String>,
    #[serde(rename = "pub", default = "yes")]
    publish: bool,
}

fn yes() -> bool {
    true
}

/// The verifying keys.
pub struct Tickets {
    keys: Vec<(Algorithm, DecodingKey)>,
}

impl std::fmt::Debug for Tickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let algs: Vec<_> = self.keys.iter().map(|(a, _)| a).collect();
        f.debug_struct("Tickets")
            .field("algorithms", &algs)
            .finish()
    }
}

impl Tickets {
    /// The configured keys; `None` when tickets are off (neither setting given).
    pub fn load(
        secret: Option<&Secret>,
        public_key_file: Option<&Path>,
    ) -> Result<Option<Tickets>, TicketSetupError> {
        let mut keys = Vec::new();
        if let Some(secret) = secret {
            keys.push((
                Algorithm::HS256,
                DecodingKey::from_secret(secret.expose().as_bytes()),
            ));
        }
        if let Some(path) = public_key_file {
            let shown = path.display().to_string();
            let pem = std::fs::read(path).map_err(|source| TicketSetupError::Read {
                path: shown.clone(),
                source,
            })?;
            let key = match DecodingKey::from_rsa_pem(&pem) {
                Ok(key) => (Algorithm::RS256, key),
                Err(_) => match DecodingKey::from_ec_pem(&pem) {
                    Ok(key) => (Algorithm::ES256, key),
                    Err(_) => return Err(TicketSetupError::Key(shown)),
                },
            };
            keys.push(key);
        }
        Ok((!keys.is_empty()).then_some(Tickets { keys }))
    }

    /// Whether `token` looks like a ticket (three base64url parts) rather than a static token.
    pub fn looks_like_ticket(token: &str) -> bool {
        token.split('.').count() == 3
    }

    /// Verify a ticket. `None`: bad signature, expired, not yet valid, another algorithm, or
    /// claims that are not ours — never a reason the client could use to probe the key.
    pub fn verify(&self, token: &str) -> Option<Grant> {
        let header = jsonwebtoken::decode_header(token).ok()?;
        let (alg, key) = self.keys.iter().find(|(alg, _)| *alg == header.alg)?;
        let mut validation = Validation::new(*alg);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let claims = jsonwebtoken::decode::<Claims>(token, key, &validation)
            .ok()?
            .claims;
        let user = claims.sub?;
        let chars = user.chars().count();
        if chars == 0 || chars > MAX_SUB_CHARS || user.chars().any(char::is_control) {
            return None;
        }
        let (prefixes, rooms): (Vec<String>, Vec<String>) =
            claims.rooms.into_iter().partition(|r| r.ends_with('*'));
        let prefixes = prefixes
            .into_iter()
            .map(|p| p.trim_end_matches('*').to_string())
            .collect();
        Some(Grant {
            user,
            rooms,
            prefixes,
            publish: claims.publish,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn hs(claims: serde_json::Value, secret: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn tickets() -> Tickets {
        Tickets::load(Some(&Secret::from("s3cret")), None)
            .unwrap()
            .unwrap()
    }

    #[test]
    fn a_valid_ticket_grants_its_rooms_and_publish_flag() {
        let t = tickets();
        let g = t
            .verify(&hs(
                json!({"sub": "ada", "exp": now() + 60, "rooms": ["lobby", "team:*"], "pub": false}),
                "s3cret",
            ))
            .unwrap();
        assert_eq!(g.user, "ada");
        assert!(!g.publish);
        assert!(g.allows("lobby") && g.allows("team:ops") && g.allows("team:"));
        assert!(!g.allows("lobby2") && !g.allows("tea"));
        let same = t
            .verify(&hs(json!({"sub": "ada", "exp": now() + 90}), "s3cret"))
            .unwrap();
        assert_eq!(g.session(), same.session(), "one user, one session");
        assert_ne!(
            g.session(),
            Grant {
                user: "bob".into(),
                ..same
            }
            .session()
        );
        let g = t
            .verify(&hs(json!({"sub": "bob", "exp": now() + 60}), "s3cret"))
            .unwrap();
        assert!(g.publish, "pub defaults to true");
        assert!(!g.allows("lobby"), "no rooms claim: no room");
    }

    #[test]
    fn bad_tickets_are_refused() {
        let t = tickets();
        for bad in [
            hs(json!({"sub": "ada", "exp": now() + 60}), "wrong"),
            hs(json!({"sub": "ada", "exp": now() - 60}), "s3cret"),
            hs(json!({"sub": "ada"}), "s3cret"),
            hs(json!({"exp": now() + 60}), "s3cret"),
            hs(json!({"sub": "", "exp": now() + 60}), "s3cret"),
            hs(json!({"sub": "x".repeat(65), "exp": now() + 60}), "s3cret"),
            hs(
                json!({"sub": "ada", "exp": now() + 60, "nbf": now() + 600}),
                "s3cret",
            ),
            hs(
                json!({"sub": "ada", "exp": now() + 60, "rooms": "lobby"}),
                "s3cret",
            ),
            "not.a.ticket".to_string(),
            // alg none: header {"alg":"none"} with no signature.
            "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhZGEiLCJleHAiOjk5OTk5OTk5OTl9.".to_string(),
        ] {
            assert_eq!(t.verify(&bad), None, "{bad}");
        }
        // HS384 with the right secret is another algorithm: refused.
        let hs384 = encode(
            &Header::new(Algorithm::HS384),
            &json!({"sub": "ada", "exp": now() + 60}),
            &EncodingKey::from_secret(b"s3cret"),
        )
        .unwrap();
        assert_eq!(t.verify(&hs384), None);
    }
}
