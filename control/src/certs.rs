//! Certificates for labs (`dwcpd certs init`): a site CA and appliance certificates
//! made with rcgen. Production sites bring their own PKI; these files have the same
//! shape (`[security] cert`, `key`, `ca`).
//!
//! An appliance certificate names the appliance (a DNS name, what `[security] peers`
//! pins) and the addresses it is reached at (what a source checks the destination's
//! certificate against), and serves both as a TLS server and a TLS client certificate:
//! every appliance is both.

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, date_time_ymd,
};
use std::path::{Path, PathBuf};

/// Why certificates could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    /// rcgen refused the parameters.
    #[error("making {what}: {source}")]
    Make {
        /// What was being made.
        what: String,
        /// rcgen's error.
        source: rcgen::Error,
    },
    /// A file could not be written or read.
    #[error("{}: {source}", path.display())]
    File {
        /// Which file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Years of validity, from the first day of this year (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// First year the certificate is valid in (from its January 1st).
    pub from_year: i32,
    /// The certificate expires on January 1st of this year.
    pub until_year: i32,
}

impl Validity {
    /// From the start of this year, for `years` years.
    pub fn years_from_now(years: i32) -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        // Days to years, close enough to pick a January 1st at or before today.
        let year = 1970 + (now as f64 / (365.2425 * 86400.0)) as i32;
        Validity {
            from_year: year,
            until_year: year + years,
        }
    }
}

/// A CA that signs appliance certificates.
pub struct LabCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    key_pem: String,
}

fn make(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> CertsError {
    let what = what.into();
    move |source| CertsError::Make { what, source }
}

impl LabCa {
    /// A new CA named `name`, valid for ten years.
    pub fn new(name: &str) -> Result<Self, CertsError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, "dwcp appliance site");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let validity = Validity::years_from_now(10);
        params.not_before = date_time_ymd(validity.from_year, 1, 1);
        params.not_after = date_time_ymd(validity.until_year, 1, 1);
        let key = KeyPair::generate().map_err(make("the CA's key"))?;
        let key_pem = key.serialize_pem();
        let issuer = CertifiedIssuer::self_signed(params, key).map_err(make("the CA"))?;
        Ok(LabCa { issuer, key_pem })
    }

    /// The CA's certificate (PEM).
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// The CA's private key (PEM).
    pub fn key_pem(&self) -> String {
        self.key_pem.clone()
    }

    /// A certificate and key (PEM) for appliance `name`, reached at `addresses` (IP
    /// addresses or DNS names), valid for `validity`.
    pub fn issue(
        &self,
        name: &str,
        addresses: &[String],
        validity: Validity,
    ) -> Result<(String, String), CertsError> {
        self.issue_with_usages(
            name,
            addresses,
            validity,
            &[KeyUsagePurpose::DigitalSignature],
        )
    }

    /// [`LabCa::issue`] for QEMU's `tls-creds-x509` (a lab comparing QEMU's TLS
    /// migration): QEMU refuses a certificate whose key usage does not also name key
    /// encipherment.
    pub fn issue_for_qemu(
        &self,
        name: &str,
        validity: Validity,
    ) -> Result<(String, String), CertsError> {
        self.issue_with_usages(
            name,
            &[],
            validity,
            &[
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ],
        )
    }

    fn issue_with_usages(
        &self,
        name: &str,
        addresses: &[String],
        validity: Validity,
        key_usages: &[KeyUsagePurpose],
    ) -> Result<(String, String), CertsError> {
        let mut names = vec![name.to_string()];
        names.extend(addresses.iter().filter(|a| a.as_str() != name).cloned());
        let mut params =
            CertificateParams::new(names).map_err(make(format!("{name}'s certificate")))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.key_usages = key_usages.to_vec();
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = date_time_ymd(validity.from_year, 1, 1);
        params.not_after = date_time_ymd(validity.until_year, 1, 1);
        let key = KeyPair::generate().map_err(make(format!("{name}'s key")))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(make(format!("{name}'s certificate")))?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// One appliance to make a certificate for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplianceSpec {
    /// Its name (a DNS name in the certificate; what peers pin).
    pub name: String,
    /// Addresses and names it is reached at.
    pub addresses: Vec<String>,
}

impl std::str::FromStr for ApplianceSpec {
    type Err = String;

    /// `NAME` (reached at loopback) or `NAME=ADDR,ADDR,...`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, addresses) = match s.split_once('=') {
            Some((name, list)) => (
                name,
                list.split(',')
                    .map(str::trim)
                    .filter(|a| !a.is_empty())
                    .map(String::from)
                    .collect(),
            ),
            None => (s, loopback()),
        };
        let name = name.trim();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        {
            return Err(format!(
                "appliance name {name:?}: use letters, digits, '-' and '.' (it becomes a DNS name)"
            ));
        }
        Ok(ApplianceSpec {
            name: name.to_string(),
            addresses,
        })
    }
}

fn loopback() -> Vec<String> {
    vec!["127.0.0.1".into(), "::1".into(), "localhost".into()]
}

/// What [`init`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The CA certificate (every appliance's `ca`).
    pub ca: PathBuf,
    /// The CA's key (keep it off the appliances).
    pub ca_key: PathBuf,
    /// Per appliance: its name, certificate and key.
    pub appliances: Vec<(String, PathBuf, PathBuf)>,
}

impl Written {
    /// `dwcpd` flags that give appliance `which` (in the order written) its identity.
    pub fn dwcpd_flags(&self, which: usize) -> Vec<String> {
        let (_, cert, key) = &self.appliances[which];
        [("--cert", cert), ("--key", key), ("--ca", &self.ca)]
            .into_iter()
            .flat_map(|(flag, path)| [flag.to_string(), path.display().to_string()])
            .collect()
    }

    /// Appliance `which`'s identity, loaded as the engine takes it (no pinned peers).
    pub fn identity(
        &self,
        which: usize,
    ) -> Result<
        std::sync::Arc<dwcp_dataplane::security::Identity>,
        dwcp_dataplane::security::SecurityError,
    > {
        let (_, cert, key) = &self.appliances[which];
        dwcp_dataplane::security::Identity::load(&dwcp_dataplane::security::SecurityFiles {
            cert: cert.clone(),
            key: key.clone(),
            ca: self.ca.clone(),
            peers: Vec::new(),
        })
    }
}

fn write(path: &Path, contents: &str, private: bool) -> Result<(), CertsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let file = |source| CertsError::File {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(file)?;
    f.write_all(contents.as_bytes()).map_err(file)
}

/// Write a lab set into `dir`: `ca.pem` and `ca-key.pem`, then `NAME.pem` and
/// `NAME-key.pem` for each appliance (two on loopback, `appliance-a` and
/// `appliance-b`, when none is given).
pub fn init(dir: &Path, appliances: &[ApplianceSpec]) -> Result<Written, CertsError> {
    std::fs::create_dir_all(dir).map_err(|source| CertsError::File {
        path: dir.to_owned(),
        source,
    })?;
    let defaults;
    let appliances = if appliances.is_empty() {
        defaults = ["appliance-a", "appliance-b"].map(|name| ApplianceSpec {
            name: name.into(),
            addresses: loopback(),
        });
        &defaults[..]
    } else {
        appliances
    };
    let ca = LabCa::new("dwcp lab CA")?;
    let written = Written {
        ca: dir.join("ca.pem"),
        ca_key: dir.join("ca-key.pem"),
        appliances: appliances
            .iter()
            .map(|a| {
                (
                    a.name.clone(),
                    dir.join(format!("{}.pem", a.name)),
                    dir.join(format!("{}-key.pem", a.name)),
                )
            })
            .collect(),
    };
    write(&written.ca, &ca.cert_pem(), false)?;
    write(&written.ca_key, &ca.key_pem(), true)?;
    for (spec, (_, cert, key)) in appliances.iter().zip(&written.appliances) {
        let (cert_pem, key_pem) =
            ca.issue(&spec.name, &spec.addresses, Validity::years_from_now(2))?;
        write(cert, &cert_pem, false)?;
        write(key, &key_pem, true)?;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dwcp_dataplane::security::{Identity, SecurityFiles};

    #[test]
    fn a_lab_set_loads_as_identities() {
        let dir = std::env::temp_dir().join(format!("dwcp-certs-{}", std::process::id()));
        let written = init(&dir, &[]).unwrap();
        assert_eq!(written.appliances.len(), 2);
        for (name, cert, key) in &written.appliances {
            let files = SecurityFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: written.ca.clone(),
                peers: vec![],
            };
            Identity::load(&files).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&written.ca_key)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "keys are private");
        // A certificate with another CA's key does not load.
        let (_, cert_b, _) = &written.appliances[1];
        let (_, _, key_a) = &written.appliances[0];
        let mixed = SecurityFiles {
            cert: cert_b.clone(),
            key: key_a.clone(),
            ca: written.ca.clone(),
            peers: vec![],
        };
        let err = Identity::load(&mixed).unwrap_err().to_string();
        assert!(err.contains("key"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn appliance_specs_parse_with_and_without_addresses() {
        let a: ApplianceSpec = "edge-1=10.0.0.5,edge-1.example".parse().unwrap();
        assert_eq!(a.addresses, vec!["10.0.0.5", "edge-1.example"]);
        let b: ApplianceSpec = "edge-2".parse().unwrap();
        assert!(b.addresses.contains(&"127.0.0.1".to_string()));
        assert!("bad name!".parse::<ApplianceSpec>().is_err());
    }
}
