//! Labelled image sets in the IDX format of MNIST and Fashion-MNIST (`*-idx3-ubyte`
//! images, `*-idx1-ubyte` labels, optionally gzip'd): the Debian package
//! `dataset-fashion-mnist` puts them in `/usr/share/datasets/fashion-mnist/`.

use crate::{Error, Result};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Where Debian's `dataset-fashion-mnist` installs the data.
pub const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Fashion-MNIST's class names, by label.
pub const FASHION_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// Grey-scale images with a label each.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageSet {
    pub rows: usize,
    pub cols: usize,
    /// `len * rows * cols` pixels, 0..=255, image after image.
    pub pixels: Vec<u8>,
    pub labels: Vec<u8>,
}

impl ImageSet {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The first `n` images (all if fewer).
    pub fn truncate(&mut self, n: usize) {
        let n = n.min(self.len());
        self.labels.truncate(n);
        self.pixels.truncate(n * self.rows * self.cols);
    }

    /// Images `idx` as floats, each pixel `(p / 255 - mean) / std`, into `out`.
    pub fn normalized(&self, idx: &[usize], mean: f32, std: f32, out: &mut Vec<f32>) {
        let px = self.rows * self.cols;
        out.clear();
        for &i in idx {
            out.extend(
                self.pixels[i * px..(i + 1) * px]
                    .iter()
                    .map(|&p| (p as f32 / 255.0 - mean) / std),
            );
        }
    }
}

fn bad(path: &Path, why: impl Into<String>) -> Error {
    Error::Images {
        path: path.to_path_buf(),
        why: why.into(),
    }
}

/// The whole file, un-gzip'd if it starts with the gzip magic.
fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| bad(path, format!("not a valid gzip stream: {e}")))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// An IDX file's unsigned-byte payload and its dimensions, checked against its header.
fn read_idx(path: &Path, dims: usize) -> Result<(Vec<usize>, Vec<u8>)> {
    let b = read_maybe_gz(path)?;
    if b.len() < 4 + 4 * dims {
        return Err(bad(
            path,
            format!("{} bytes: shorter than an IDX header", b.len()),
        ));
    }
    if b[0] != 0 || b[1] != 0 || b[2] != 0x08 || b[3] as usize != dims {
        return Err(bad(
            path,
            format!(
                "magic {:02x}{:02x}{:02x}{:02x}: not an IDX file of unsigned bytes in {dims} dimension(s)",
                b[0], b[1], b[2], b[3]
            ),
        ));
    }
    let shape: Vec<usize> = (0..dims)
        .map(|i| {
            u32::from_be_bytes([b[4 + 4 * i], b[5 + 4 * i], b[6 + 4 * i], b[7 + 4 * i]]) as usize
        })
        .collect();
    let want: usize = shape.iter().product();
    let data = &b[4 + 4 * dims..];
    if data.len() != want {
        return Err(bad(
            path,
            format!(
                "the header promises {shape:?} = {want} bytes, the file holds {} (truncated or corrupt)",
                data.len()
            ),
        ));
    }
    Ok((shape, data.to_vec()))
}

/// Reads an image file and its label file; they must hold the same number of items,
/// labels below `classes`.
pub fn read_idx_pair(images: &Path, labels: &Path, classes: usize) -> Result<ImageSet> {
    let (shape, pixels) = read_idx(images, 3)?;
    let (lshape, labs) = read_idx(labels, 1)?;
    if lshape[0] != shape[0] {
        return Err(bad(
            labels,
            format!(
                "{} labels for the {} images of {}",
                lshape[0],
                shape[0],
                images.display()
            ),
        ));
    }
    if let Some(i) = labs.iter().position(|&l| l as usize >= classes) {
        return Err(bad(
            labels,
            format!("item {i}: label {} of {classes} classes", labs[i]),
        ));
    }
    Ok(ImageSet {
        rows: shape[1],
        cols: shape[2],
        pixels,
        labels: labs,
    })
}

/// The first of `names` that exists in `dir` (plain or `.gz`).
fn find(dir: &Path, stem: &str) -> Result<PathBuf> {
    for p in [dir.join(format!("{stem}.gz")), dir.join(stem)] {
        if p.exists() {
            return Ok(p);
        }
    }
    Err(bad(
        &dir.join(stem),
        "missing (install Debian's dataset-fashion-mnist, or point --data-dir at the IDX files)",
    ))
}

/// The training and test sets of (Fashion-)MNIST in `dir`.
pub fn load_mnist_dir(dir: &Path) -> Result<(ImageSet, ImageSet)> {
    let train = read_idx_pair(
        &find(dir, "train-images-idx3-ubyte")?,
        &find(dir, "train-labels-idx1-ubyte")?,
        10,
    )?;
    let test = read_idx_pair(
        &find(dir, "t10k-images-idx3-ubyte")?,
        &find(dir, "t10k-labels-idx1-ubyte")?,
        10,
    )?;
    Ok((train, test))
}
