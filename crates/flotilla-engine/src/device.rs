//! Where a model runs: `cpu` or `cuda:N`, chosen at run time.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

use crate::error::EngineError;

/// A device named in config or on the command line: `cpu`, `cuda` (GPU 0) or `cuda:N`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
}

impl DeviceSpec {
    /// Whether this binary was built with `--features cuda`.
    pub const CUDA_BUILD: bool = cfg!(feature = "cuda");

    /// Fails at once, in one line, when the build cannot use this device at all: a GPU
    /// asked of a build without CUDA. (Whether the GPU is there is known only on open.)
    pub fn check_build(self) -> Result<(), EngineError> {
        match self {
            DeviceSpec::Cuda(_) if !Self::CUDA_BUILD => Err(EngineError::Device(format!(
                "device `{self}` needs a CUDA build of flotilla; this one was built without \
                 it (rebuild with `--features cuda`, see README \"GPU hosts\"), or use `cpu`"
            ))),
            _ => Ok(()),
        }
    }

    /// Opens the device; a CUDA build that finds no usable GPU says so in one line.
    pub fn open(self) -> Result<Device, EngineError> {
        self.check_build()?;
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => Device::new_cuda(n).map_err(|e| {
                let e = e.to_string();
                let first = e.lines().next().unwrap_or_default();
                EngineError::Device(format!("no usable GPU at `{self}`: {first}"))
            }),
        }
    }

    pub fn is_cuda(self) -> bool {
        matches!(self, DeviceSpec::Cuda(_))
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("device `{s}` is not `cpu`, `cuda` or `cuda:N`");
        match s.trim() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            other => match other.strip_prefix("cuda:") {
                Some(n) => n.parse().map(DeviceSpec::Cuda).map_err(|_| bad()),
                None => Err(bad()),
            },
        }
    }
}

impl serde::Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        assert_eq!("cpu".parse(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceSpec::Cuda(3)));
        assert_eq!(DeviceSpec::Cuda(3).to_string(), "cuda:3");
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "CPU0"] {
            let e = bad.parse::<DeviceSpec>().unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn cpu_build_refuses_cuda_in_one_line() {
        if DeviceSpec::CUDA_BUILD {
            return;
        }
        let e = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        assert!(e.contains("cuda:0") && e.contains("--features cuda"), "{e}");
        assert!(!e.contains('\n'));
        assert!(DeviceSpec::Cpu.open().unwrap().is_cpu());
    }
}
