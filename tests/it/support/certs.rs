//! A throw-away certificate authority with server and client certificates (openssl).

use super::*;
use std::fs::{self};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

/// A throw-away CA with a server certificate for 127.0.0.1 and client certificates, made with
/// Debian's `openssl` (PEM files in a temporary directory, kept while any clone lives).
#[derive(Clone)]
pub struct Certs {
    dir: Arc<tempfile::TempDir>,
    /// The CA certificate.
    pub ca: PathBuf,
    /// The broker's certificate (subjectAltName IP:127.0.0.1).
    pub server_cert: PathBuf,
    /// Its key.
    pub server_key: PathBuf,
}

/// A client certificate and its key.
#[derive(Debug, Clone)]
pub struct ClientCert {
    /// Certificate (PEM).
    pub cert: PathBuf,
    /// Key (PKCS#8 PEM).
    pub key: PathBuf,
}

/// Runs `openssl` with `args` (split at spaces) in `dir`.
fn openssl(dir: &Path, args: &str) {
    let out = Command::new("openssl")
        .args(args.split_whitespace())
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Certs {
    /// A new CA and a server certificate for 127.0.0.1 (P-256 keys).
    pub fn new() -> Certs {
        let dir = tempdir();
        let d = dir.path();
        fs::write(
            d.join("ca.cnf"),
            "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = edge-agent test CA\n\
             [v3_ca]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\n\
             subjectKeyIdentifier = hash\n",
        )
        .unwrap();
        openssl(
            d,
            "req -x509 -config ca.cnf -extensions v3_ca -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
             -nodes -keyout ca.key -out ca.crt -days 2",
        );
        let certs = Certs {
            ca: d.join("ca.crt"),
            server_cert: d.join("server.crt"),
            server_key: d.join("server.key"),
            dir: Arc::new(dir),
        };
        certs.issue(
            "server",
            "127.0.0.1",
            "subjectAltName = IP:127.0.0.1\nbasicConstraints = CA:FALSE\n\
             keyUsage = critical,digitalSignature\nextendedKeyUsage = serverAuth\n",
        );
        certs
    }

    fn issue(&self, file: &str, cn: &str, extensions: &str) -> ClientCert {
        let d = self.dir.path();
        fs::write(d.join(format!("{file}.ext")), extensions).unwrap();
        openssl(
            d,
            &format!(
                "req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout {file}.key \
                 -out {file}.csr -subj /CN={cn}"
            ),
        );
        let serial = 2 + fs::read_dir(d).map(Iterator::count).unwrap_or(0);
        openssl(
            d,
            &format!(
                "x509 -req -in {file}.csr -CA ca.crt -CAkey ca.key -set_serial {serial} -days 2 \
                 -out {file}.crt -extfile {file}.ext"
            ),
        );
        ClientCert {
            cert: d.join(format!("{file}.crt")),
            key: d.join(format!("{file}.key")),
        }
    }

    /// A client certificate with `cn` as its common name (mosquitto's username for it).
    pub fn client(&self, cn: &str) -> ClientCert {
        self.issue(
            &format!("client-{cn}"),
            cn,
            "basicConstraints = CA:FALSE\nkeyUsage = critical,digitalSignature\nextendedKeyUsage = clientAuth\n",
        )
    }
}
