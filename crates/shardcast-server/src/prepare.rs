//! [`Prepared`]: a validated [`Config`] with what it names loaded, once: the JWT key parsed
//! into `Auth`, the TLS certificate and key into an acceptor, the broker's files checked.
//! Above `config.rs`, `auth.rs` and `tls.rs`, so none of them imports another in a circle.

use std::fmt;

use crate::{Config, Error};

/// A validated [`Config`] with its credentials and TLS files loaded ([`Config::prepare`]).
pub struct Prepared {
    pub(crate) config: Config,
    pub(crate) auth: crate::auth::Auth,
    pub(crate) tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Prepared {
    pub fn config(&self) -> &Config {
        &self.config
    }
}

impl fmt::Debug for Prepared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Prepared")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// Validates the configuration and loads what it names: the JWT key is parsed and the
    /// TLS certificate and key are read, once, here. The binary calls this before it serves
    /// (and `shardcast config` to check), so a bad file is a configuration error (exit 2).
    pub fn prepare(self) -> Result<Prepared, Error> {
        self.validate()?;
        let auth = crate::auth::Auth::new(&self.auth)?;
        let tls = self.tls.as_ref().map(crate::tls::acceptor).transpose()?;
        if let Some(bus) = &self.bus {
            bus.check_files().map_err(Error::Config)?;
        }
        Ok(Prepared {
            config: self,
            auth,
            tls,
        })
    }
}
