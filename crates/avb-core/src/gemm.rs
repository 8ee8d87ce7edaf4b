//! The ridge fit's large f32 products. On x86-64 with AVX2 and FMA they run through a packed, cache-blocked
//! kernel (the BLIS scheme with C column-major: a slice of A packed once and shared by the threads from L3,
//! blocks of B packed per thread to stay in L2, a 16 x 6 register tile of C). Elsewhere (wasm32, other CPUs,
//! small products) faer computes them.

use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::{Accum, Mat, MatMut, MatRef};

/// Whether the products below run through avbridge's kernel on this CPU.
pub fn kernel_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// An operand of the products: a matrix minus a vector along one of its axes, so that centring needs no copy.
#[derive(Clone, Copy)]
pub struct Shifted<'a> {
    pub m: MatRef<'a, f32>,
    pub shift: Shift<'a>,
}

#[derive(Clone, Copy)]
pub enum Shift<'a> {
    None,
    /// m[i, j] - s[i]
    Rows(&'a [f32]),
    /// m[i, j] - s[j]
    Cols(&'a [f32]),
}

impl<'a> From<MatRef<'a, f32>> for Shifted<'a> {
    fn from(m: MatRef<'a, f32>) -> Self {
        Shifted {
            m,
            shift: Shift::None,
        }
    }
}

impl<'a> Shifted<'a> {
    /// m minus `s` from every row (s[j] from column j): rows of activations minus their mean.
    pub fn minus_row(m: MatRef<'a, f32>, s: &'a [f32]) -> Self {
        assert_eq!(s.len(), m.ncols(), "one shift per column");
        Shifted {
            m,
            shift: Shift::Cols(s),
        }
    }

    pub fn transpose(self) -> Self {
        Shifted {
            m: self.m.transpose(),
            shift: match self.shift {
                Shift::None => Shift::None,
                Shift::Rows(s) => Shift::Cols(s),
                Shift::Cols(s) => Shift::Rows(s),
            },
        }
    }

    /// The shifted values as a column-major matrix, copied in tiles so that reads and writes both stay within
    /// a few cache lines whatever the layout of m.
    pub fn to_mat(&self) -> Mat<f32> {
        let mut out = Mat::<f32>::zeros(self.m.nrows(), self.m.ncols());
        self.write_to(out.as_mut());
        out
    }

    /// Write the shifted values into `out` (same shape, any layout), in tiles.
    pub fn write_to(&self, mut out: MatMut<'_, f32>) {
        const TILE: usize = 64;
        let (r, c) = (self.m.nrows(), self.m.ncols());
        assert_eq!((out.nrows(), out.ncols()), (r, c), "same shape");
        for j0 in (0..c).step_by(TILE) {
            for i0 in (0..r).step_by(TILE) {
                for j in j0..(j0 + TILE).min(c) {
                    for i in i0..(i0 + TILE).min(r) {
                        out[(i, j)] = self.value(i, j);
                    }
                }
            }
        }
    }

    fn value(&self, i: usize, j: usize) -> f32 {
        self.m[(i, j)]
            - match self.shift {
                Shift::None => 0.0,
                Shift::Rows(s) => s[i],
                Shift::Cols(s) => s[j],
            }
    }
}

/// a b
pub fn product<'a, 'b>(a: impl Into<Shifted<'a>>, b: impl Into<Shifted<'b>>) -> Mat<f32> {
    let (a, b) = (a.into(), b.into());
    let mut c = Mat::<f32>::zeros(a.m.nrows(), b.m.ncols());
    add_product(c.as_mut(), false, a, b, 1.0, Accum::Replace);
    c
}

/// c = a b, written into caller-owned storage (any shape-matching layout; the kernel serves column-major c).
pub fn product_into<'a, 'b>(
    c: MatMut<'_, f32>,
    a: impl Into<Shifted<'a>>,
    b: impl Into<Shifted<'b>>,
) {
    update(c, a.into(), b.into(), 1.0, Accum::Replace);
}

/// c -= a b, in place (c in any layout; the kernel serves column-major c).
pub fn sub_product<'a, 'b>(
    c: MatMut<'_, f32>,
    a: impl Into<Shifted<'a>>,
    b: impl Into<Shifted<'b>>,
) {
    update(c, a.into(), b.into(), -1.0, Accum::Add);
}

fn update(c: MatMut<'_, f32>, a: Shifted<'_>, b: Shifted<'_>, alpha: f32, accum: Accum) {
    assert_eq!(
        (c.nrows(), c.ncols()),
        (a.m.nrows(), b.m.ncols()),
        "output shape"
    );
    add_product(c, false, a, b, alpha, accum);
}

/// The lower triangle of the symmetric product a b (b = a^T, passed separately so either layout can be used):
/// half the flops of a full product. The strict upper triangle is zero.
pub fn lower_product<'a, 'b>(a: impl Into<Shifted<'a>>, b: impl Into<Shifted<'b>>) -> Mat<f32> {
    let (a, b) = (a.into(), b.into());
    let mut c = Mat::<f32>::zeros(a.m.nrows(), b.m.ncols());
    add_product(c.as_mut(), true, a, b, 1.0, Accum::Replace);
    zero_upper(c.as_mut());
    c
}

/// The kernel computes whole tiles on the diagonal; keep the contract that the strict upper triangle is zero.
fn zero_upper(mut c: MatMut<'_, f32>) {
    for j in 1..c.ncols() {
        for i in 0..j.min(c.nrows()) {
            c[(i, j)] = 0.0;
        }
    }
}

/// c = alpha a b (Replace) or c += alpha a b (Add); with `lower`, only entries on or below the diagonal are
/// required (others may change or keep what they held).
fn add_product(
    c: MatMut<'_, f32>,
    lower: bool,
    a: Shifted<'_>,
    b: Shifted<'_>,
    alpha: f32,
    accum: Accum,
) {
    #[cfg(target_arch = "x86_64")]
    if use_kernel(&c, &a.m, &b.m) {
        // SAFETY: AVX2 and FMA were detected, and c is column-major (row stride 1).
        unsafe { avx2::add_product(c, lower, a, b, alpha, accum, avx2::STRASSEN_MIN_HALF) };
        return;
    }
    let shifted = |o: &Shifted<'_>| match o.shift {
        Shift::None => None,
        _ => Some(o.to_mat()),
    };
    let (a_copy, b_copy) = (shifted(&a), shifted(&b));
    let a = a_copy.as_ref().map_or(a.m, |m| m.as_ref());
    let b = b_copy.as_ref().map_or(b.m, |m| m.as_ref());
    let par = faer::get_global_parallelism();
    if lower {
        triangular::matmul(
            c,
            BlockStructure::TriangularLower,
            accum,
            a,
            BlockStructure::Rectangular,
            b,
            BlockStructure::Rectangular,
            alpha,
            par,
        );
    } else {
        faer::linalg::matmul::matmul(c, accum, a, b, alpha, par);
    }
}

/// Large enough for packing to pay off, and C in the layout the kernel stores (column-major).
#[cfg(target_arch = "x86_64")]
fn use_kernel(c: &MatMut<'_, f32>, a: &MatRef<'_, f32>, b: &MatRef<'_, f32>) -> bool {
    let (m, n, k) = (a.nrows(), b.ncols(), a.ncols());
    c.row_stride() == 1
        && m >= avx2::MR
        && n >= avx2::NR
        && m * n * k >= 1 << 18
        && kernel_available()
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Shift, Shifted};
    use faer::{Accum, MatMut};
    use std::arch::x86_64::*;

    /// Register tile: MR rows (two 8-lane vectors along C's contiguous columns) by NR columns; 12 accumulators.
    pub(super) const MR: usize = 16;
    pub(super) const NR: usize = 6;
    /// Depth of one packed slice: an MR x KC micro-panel of A (16 KiB) stays in L1 while the KC x NR
    /// micro-panels of B (6 KiB each) stream past it from L2.
    const KC: usize = 256;
    /// Most B micro-panels per thread block: 32 x 6 columns x KC = 192 KiB, within a 512 KiB L2.
    const NB_PANELS: usize = 32;
    /// Rows of A packed at once and shared by the threads (KC x MC = 4 MiB, in L3): Gram matrices of the
    /// models' widths (up to 8192) need two passes.
    const MC: usize = 256 * MR;

    #[derive(Clone, Copy)]
    #[repr(C, align(64))]
    struct Line([f32; 16]);

    /// A zeroed f32 buffer that starts on a cache line, so that the kernel's 32-byte loads of packed panels never
    /// straddle two lines (large allocations are only 16-byte aligned).
    struct Packed(Vec<Line>);

    impl Packed {
        fn new(len: usize) -> Self {
            Packed(vec![Line([0.0; 16]); len.div_ceil(16)])
        }
        fn as_mut_slice(&mut self) -> &mut [f32] {
            // SAFETY: Line is 16 f32s with no padding (repr(C), 64 bytes).
            unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast(), self.0.len() * 16) }
        }
    }

    /// A matrix element pointer with strides and the shift subtracted along rows or columns (null: none),
    /// shareable across the worker threads (read-only use).
    #[derive(Clone, Copy)]
    struct Src {
        ptr: *const f32,
        rs: isize,
        cs: isize,
        row_shift: *const f32,
        col_shift: *const f32,
    }
    unsafe impl Send for Src {}
    unsafe impl Sync for Src {}

    impl Src {
        fn of(o: &Shifted<'_>) -> Self {
            let (row_shift, col_shift) = match o.shift {
                Shift::None => (std::ptr::null(), std::ptr::null()),
                Shift::Rows(s) => (s.as_ptr(), std::ptr::null()),
                Shift::Cols(s) => (std::ptr::null(), s.as_ptr()),
            };
            Src {
                ptr: o.m.as_ptr(),
                rs: o.m.row_stride(),
                cs: o.m.col_stride(),
                row_shift,
                col_shift,
            }
        }
        /// The same matrix from (i, j) on: a block of it, for Strassen's quadrants.
        fn offset(self, i: usize, j: usize) -> Self {
            Src {
                ptr: self
                    .ptr
                    .wrapping_offset(i as isize * self.rs + j as isize * self.cs),
                row_shift: if self.row_shift.is_null() {
                    self.row_shift
                } else {
                    self.row_shift.wrapping_add(i)
                },
                col_shift: if self.col_shift.is_null() {
                    self.col_shift
                } else {
                    self.col_shift.wrapping_add(j)
                },
                ..self
            }
        }
        fn transpose(self) -> Self {
            Src {
                ptr: self.ptr,
                rs: self.cs,
                cs: self.rs,
                row_shift: self.col_shift,
                col_shift: self.row_shift,
            }
        }
        /// SAFETY: (i, j) inside the matrix this was made from.
        unsafe fn at(self, i: usize, j: usize) -> *const f32 {
            self.ptr
                .wrapping_offset(i as isize * self.rs + j as isize * self.cs)
        }
        /// SAFETY: i inside the matrix's rows.
        unsafe fn row_shift(self, i: usize) -> f32 {
            if self.row_shift.is_null() {
                0.0
            } else {
                *self.row_shift.add(i)
            }
        }
        /// SAFETY: j inside the matrix's columns.
        unsafe fn col_shift(self, j: usize) -> f32 {
            if self.col_shift.is_null() {
                0.0
            } else {
                *self.col_shift.add(j)
            }
        }
    }

    /// A product's operand as packed: one block, or the sum of two equally shaped blocks with a sign on the
    /// second (Strassen's operand sums, formed while packing rather than in memory).
    #[derive(Clone, Copy)]
    struct Operand {
        first: Src,
        second: Option<(Src, f32)>,
    }

    impl Operand {
        fn one(first: Src) -> Self {
            Operand {
                first,
                second: None,
            }
        }
        fn plus(first: Src, second: Src) -> Self {
            Operand {
                first,
                second: Some((second, 1.0)),
            }
        }
        fn minus(first: Src, second: Src) -> Self {
            Operand {
                first,
                second: Some((second, -1.0)),
            }
        }
        fn transpose(self) -> Self {
            Operand {
                first: self.first.transpose(),
                second: self.second.map(|(s, sign)| (s.transpose(), sign)),
            }
        }
        /// Every term from (i, j) on.
        fn offset(self, i: usize, j: usize) -> Self {
            Operand {
                first: self.first.offset(i, j),
                second: self.second.map(|(s, sign)| (s.offset(i, j), sign)),
            }
        }
    }

    /// Where a product lands in C (column-major, a block of it from `ptr` on): c = alpha p when `replace`, else
    /// c += alpha p. Threads write disjoint column blocks.
    #[derive(Clone, Copy)]
    struct Target {
        ptr: *mut f32,
        ldc: usize,
        alpha: f32,
        replace: bool,
    }
    unsafe impl Send for Target {}
    unsafe impl Sync for Target {}

    impl Target {
        fn offset(self, i: usize, j: usize) -> Self {
            Target {
                ptr: self.ptr.wrapping_add(i + j * self.ldc),
                ..self
            }
        }
        /// This block's share of a Strassen product: `sign`, and a replacing store only for its first product.
        fn share(self, sign: f32, first: bool) -> Self {
            Target {
                alpha: sign * self.alpha,
                replace: self.replace && first,
                ..self
            }
        }
    }

    /// Strassen's one-level scheme pays above this size of every half (the kernel runs at its full rate on
    /// halves this large, and the operand sums cost a pass over A and B, small next to an eighth of the flops).
    pub(super) const STRASSEN_MIN_HALF: usize = 1024;

    /// c = alpha a b or c += alpha a b (with `lower`, tiles strictly above the diagonal are skipped). A replacing
    /// product stores its first K slice without reading C: one pass over C fewer, and no zeroing beforehand.
    /// Large general products take one level of Strassen's scheme (`strassen_min_half`: the smallest half).
    ///
    /// SAFETY: the CPU has AVX2 and FMA; c has row stride 1 and the shapes agree.
    pub(super) unsafe fn add_product(
        mut c: MatMut<'_, f32>,
        lower: bool,
        a: Shifted<'_>,
        b: Shifted<'_>,
        alpha: f32,
        accum: Accum,
        strassen_min_half: usize,
    ) {
        let (m, n, k) = (a.m.nrows(), b.m.ncols(), a.m.ncols());
        if k == 0 {
            if accum == Accum::Replace {
                c.fill(0.0);
            }
            return;
        }
        let target = Target {
            ptr: c.as_ptr_mut(),
            ldc: c.col_stride() as usize,
            alpha,
            replace: accum == Accum::Replace,
        };
        let (a, b) = (Src::of(&a), Src::of(&b));
        if !lower && m.min(n).min(k) / 2 >= strassen_min_half {
            strassen(target, a, b, m, n, k);
        } else {
            run(&[target], lower, Operand::one(a), Operand::one(b), m, n, k);
        }
    }

    /// One level of Strassen's scheme: seven half-size products instead of eight. The operand sums are formed
    /// while packing and each product is stored into the one or two quadrants of C it enters, so nothing of
    /// A, B or C is copied. An odd last row, column or K index is added by ordinary products.
    fn strassen(t: Target, a: Src, b: Src, m: usize, n: usize, k: usize) {
        let (m2, n2, k2) = (m / 2, n / 2, k / 2);
        let (a11, a12, a21, a22) = (a, a.offset(0, k2), a.offset(m2, 0), a.offset(m2, k2));
        let (b11, b12, b21, b22) = (b, b.offset(0, n2), b.offset(k2, 0), b.offset(k2, n2));
        let (c11, c12, c21, c22) = (t, t.offset(0, n2), t.offset(m2, 0), t.offset(m2, n2));
        let half =
            |targets: &[Target], a: Operand, b: Operand| run(targets, false, a, b, m2, n2, k2);
        half(
            &[c11.share(1.0, true), c22.share(1.0, true)],
            Operand::plus(a11, a22),
            Operand::plus(b11, b22),
        );
        half(
            &[c21.share(1.0, true), c22.share(-1.0, false)],
            Operand::plus(a21, a22),
            Operand::one(b11),
        );
        half(
            &[c12.share(1.0, true), c22.share(1.0, false)],
            Operand::one(a11),
            Operand::minus(b12, b22),
        );
        half(
            &[c11.share(1.0, false), c21.share(1.0, false)],
            Operand::one(a22),
            Operand::minus(b21, b11),
        );
        half(
            &[c11.share(-1.0, false), c12.share(1.0, false)],
            Operand::plus(a11, a12),
            Operand::one(b22),
        );
        half(
            &[c22.share(1.0, false)],
            Operand::minus(a21, a11),
            Operand::plus(b11, b12),
        );
        half(
            &[c11.share(1.0, false)],
            Operand::minus(a12, a22),
            Operand::plus(b21, b22),
        );
        let (a, b) = (Operand::one(a), Operand::one(b));
        if k > 2 * k2 {
            let last = [t.share(1.0, false)];
            run(
                &last,
                false,
                a.offset(0, 2 * k2),
                b.offset(2 * k2, 0),
                2 * m2,
                2 * n2,
                1,
            );
        }
        if m > 2 * m2 {
            run(
                &[t.offset(2 * m2, 0)],
                false,
                a.offset(2 * m2, 0),
                b,
                1,
                n,
                k,
            );
        }
        if n > 2 * n2 {
            run(
                &[t.offset(0, 2 * n2)],
                false,
                a,
                b.offset(0, 2 * n2),
                2 * m2,
                1,
                k,
            );
        }
    }

    /// The packed product a b (m x n, depth k) into every target.
    fn run(targets: &[Target], lower: bool, a: Operand, b: Operand, m: usize, n: usize, k: usize) {
        let n_panels = n.div_ceil(NR);
        // Column blocks in a multiple of the thread count, so the last round keeps every core busy.
        let threads = threads();
        let blocks = (n_panels.div_ceil(NB_PANELS).div_ceil(threads) * threads).min(n_panels);
        let mc_max = MC.min(m.div_ceil(MR) * MR);
        let mut packed_a = Packed::new(KC * mc_max);
        let packed_a = packed_a.as_mut_slice();
        for ic in (0..m).step_by(MC) {
            let mc = MC.min(m - ic);
            let bounds = block_bounds(n_panels, blocks, lower.then_some((ic, mc)));
            for pc in (0..k).step_by(KC) {
                let kc = KC.min(k - pc);
                pack_a(
                    &mut packed_a[..kc * mc.div_ceil(MR) * MR],
                    a,
                    ic,
                    pc,
                    mc,
                    kc,
                );
                let packed_a = &packed_a[..];
                for_each_block(bounds.len() - 1, kc, |packed_b, block| {
                    let (q0, q1) = (bounds[block], bounds[block + 1]);
                    let (jc, nc) = (q0 * NR, (q1 * NR).min(n) - q0 * NR);
                    if lower && jc >= ic + mc {
                        return;
                    }
                    pack_b(packed_b, b, pc, jc, kc, nc);
                    let tile = TileSpan {
                        ic,
                        mc,
                        jc,
                        nc,
                        kc,
                        first_slice: pc == 0,
                    };
                    // SAFETY: the caller's CPU features; the block's columns are this thread's alone.
                    unsafe { block_product(targets, lower, packed_a, packed_b, tile) };
                });
            }
        }
    }

    /// The rows and columns of C that one packed A slice and one packed B block cover, and whether this K
    /// slice is the product's first (a replacing target stores rather than adds).
    #[derive(Clone, Copy)]
    struct TileSpan {
        ic: usize,
        mc: usize,
        jc: usize,
        nc: usize,
        kc: usize,
        first_slice: bool,
    }

    /// Column blocks as panel ranges: `blocks` equal ones, or for a lower-triangle product against the rows
    /// ic..ic + mc, ranges of about equal work (a panel left of the diagonal meets more row tiles than one on its
    /// right), so that no thread is left with a heavy block at the end of a slice. No block exceeds NB_PANELS.
    fn block_bounds(n_panels: usize, blocks: usize, lower: Option<(usize, usize)>) -> Vec<usize> {
        let Some((ic, mc)) = lower else {
            return (0..=blocks).map(|b| b * n_panels / blocks).collect();
        };
        let tiles = |q: usize| {
            let first = (q * NR).saturating_sub(ic) / MR;
            mc.div_ceil(MR).saturating_sub(first)
        };
        let target = (0..n_panels)
            .map(tiles)
            .sum::<usize>()
            .div_ceil(blocks)
            .max(1);
        let mut bounds = vec![0];
        let mut work = 0;
        for q in 0..n_panels {
            work += tiles(q);
            if work >= target || q + 1 - bounds[bounds.len() - 1] == NB_PANELS {
                bounds.push(q + 1);
                work = 0;
            }
        }
        if bounds[bounds.len() - 1] != n_panels {
            bounds.push(n_panels);
        }
        bounds
    }

    fn threads() -> usize {
        #[cfg(feature = "parallel")]
        {
            rayon::current_num_threads()
        }
        #[cfg(not(feature = "parallel"))]
        {
            1
        }
    }

    /// Run `f(packed_b_buffer, block)` for every column block, on all cores when built with `parallel`.
    fn for_each_block(blocks: usize, kc: usize, f: impl Fn(&mut [f32], usize) + Sync + Send) {
        // Each block has at most NB_PANELS panels (blocks >= n_panels / NB_PANELS).
        let buffer = || Packed::new(NB_PANELS * NR * kc);
        #[cfg(feature = "parallel")]
        {
            use rayon::prelude::*;
            (0..blocks)
                .into_par_iter()
                .with_max_len(1)
                .for_each_init(buffer, |buf, i| f(buf.as_mut_slice(), i));
        }
        #[cfg(not(feature = "parallel"))]
        {
            let mut buf = buffer();
            (0..blocks).for_each(|i| f(buf.as_mut_slice(), i));
        }
    }

    /// How packing writes a value: the first term of an operand stores it, a second term adds it with a sign.
    #[derive(Clone, Copy)]
    enum Put {
        Store,
        Add(f32),
    }

    impl Put {
        #[inline(always)]
        fn put(self, slot: &mut f32, v: f32) {
            match self {
                Put::Store => *slot = v,
                Put::Add(sign) => *slot += sign * v,
            }
        }
    }

    /// Each term of an operand, with how it enters the packed buffer.
    fn terms(o: Operand) -> impl Iterator<Item = (Src, Put)> {
        std::iter::once((o.first, Put::Store)).chain(o.second.map(|(s, sign)| (s, Put::Add(sign))))
    }

    /// Rows i0..i0 + rows (at most W) of `a` over columns pc..pc + kc as one panel: kc groups of W values,
    /// zero-padded, each term of the operand stored or added. B's panels are panels of B^T.
    fn pack_panel<const W: usize>(
        panel: &mut [f32],
        a: Operand,
        (i0, rows): (usize, usize),
        (pc, kc): (usize, usize),
    ) {
        if rows < W {
            panel.fill(0.0);
        }
        for (a, put) in terms(a) {
            // SAFETY: rows i0..i0+rows and columns pc..pc+kc are inside the operand.
            unsafe {
                if a.rs == 1 && rows == W {
                    let row_shift: [f32; W] = std::array::from_fn(|r| a.row_shift(i0 + r));
                    for (kk, col) in panel.chunks_exact_mut(W).enumerate() {
                        let (src, col_shift) = (a.at(i0, pc + kk), a.col_shift(pc + kk));
                        for (r, v) in col.iter_mut().enumerate() {
                            put.put(v, *src.wrapping_add(r) - row_shift[r] - col_shift);
                        }
                    }
                } else {
                    for ii in 0..rows {
                        let (src, row_shift) = (a.at(i0 + ii, pc), a.row_shift(i0 + ii));
                        for kk in 0..kc {
                            let v = *src.wrapping_offset(kk as isize * a.cs) - row_shift;
                            put.put(&mut panel[kk * W + ii], v - a.col_shift(pc + kk));
                        }
                    }
                }
            }
        }
    }

    /// A[ic.., pc..] (mc x kc) as MR-row panels, each kc columns of MR values, zero-padded.
    fn pack_a(out: &mut [f32], a: Operand, ic: usize, pc: usize, mc: usize, kc: usize) {
        let pack = |p: usize, panel: &mut [f32]| {
            pack_panel::<MR>(panel, a, (ic + p * MR, MR.min(mc - p * MR)), (pc, kc));
        };
        #[cfg(feature = "parallel")]
        {
            use rayon::prelude::*;
            out.par_chunks_mut(kc * MR)
                .enumerate()
                .for_each(|(p, panel)| pack(p, panel));
        }
        #[cfg(not(feature = "parallel"))]
        out.chunks_mut(kc * MR)
            .enumerate()
            .for_each(|(p, panel)| pack(p, panel));
    }

    /// B[pc.., jc..] (kc x nc) as NR-column panels, each kc rows of NR values, zero-padded.
    fn pack_b(out: &mut [f32], b: Operand, pc: usize, jc: usize, kc: usize, nc: usize) {
        let bt = b.transpose();
        for (q, panel) in out[..nc.div_ceil(NR) * NR * kc]
            .chunks_exact_mut(NR * kc)
            .enumerate()
        {
            pack_panel::<NR>(panel, bt, (jc + q * NR, NR.min(nc - q * NR)), (pc, kc));
        }
    }

    /// The packed A slice against one packed B block: every MR x NR tile of C[ic.., jc..] in every target. Each
    /// A micro-panel stays in L1 while the block's B micro-panels stream past it from L2.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block_product(
        targets: &[Target],
        lower: bool,
        packed_a: &[f32],
        packed_b: &[f32],
        span: TileSpan,
    ) {
        let TileSpan {
            ic,
            mc,
            jc,
            nc,
            kc,
            first_slice,
        } = span;
        for p in 0..mc.div_ceil(MR) {
            let (i0, rows) = (ic + p * MR, MR.min(mc - p * MR));
            if lower && i0 + rows <= jc {
                continue;
            }
            let pa = packed_a.as_ptr().add(p * kc * MR);
            for q in 0..nc.div_ceil(NR) {
                let (j0, cols) = (jc + q * NR, NR.min(nc - q * NR));
                if lower && j0 >= i0 + rows {
                    break;
                }
                // C's tiles are touched once per K slice and usually not in cache: fetch them while the
                // products run.
                for t in targets {
                    let c = t.offset(i0, j0).ptr;
                    for j in 0..cols {
                        _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(j * t.ldc) as *const i8);
                        _mm_prefetch::<_MM_HINT_T0>(
                            c.wrapping_add(j * t.ldc + rows - 1) as *const i8
                        );
                    }
                }
                let acc = tile_product(kc, pa, packed_b.as_ptr().add(q * kc * NR));
                for t in targets {
                    let add = !first_slice || !t.replace;
                    store_tile(&acc, t.offset(i0, j0), rows, cols, add);
                }
            }
        }
    }

    /// A packed MR x kc A panel times a packed kc x NR B panel, accumulated in registers.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn tile_product(kc: usize, pa: *const f32, pb: *const f32) -> [[__m256; 2]; NR] {
        // Pointer steps wrap rather than add: identical code, but test builds (debug assertions on) would check
        // every step of this loop.
        let mut acc = [[_mm256_setzero_ps(); 2]; NR];
        let (mut pa, mut pb) = (pa, pb);
        for _ in 0..kc {
            let a0 = _mm256_loadu_ps(pa);
            let a1 = _mm256_loadu_ps(pa.wrapping_add(8));
            for (j, acc_j) in acc.iter_mut().enumerate() {
                let bj = _mm256_broadcastss_ps(_mm_load_ss(pb.wrapping_add(j)));
                acc_j[0] = _mm256_fmadd_ps(a0, bj, acc_j[0]);
                acc_j[1] = _mm256_fmadd_ps(a1, bj, acc_j[1]);
            }
            pa = pa.wrapping_add(MR);
            pb = pb.wrapping_add(NR);
        }
        acc
    }

    /// C[0..rows, 0..cols] of the target (+)= alpha * acc.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn store_tile(acc: &[[__m256; 2]; NR], t: Target, rows: usize, cols: usize, add: bool) {
        let (c, ldc) = (t.ptr, t.ldc);
        let va = _mm256_set1_ps(t.alpha);
        if rows == MR && cols == NR {
            for (j, acc_j) in acc.iter().enumerate() {
                for (half, acc_half) in acc_j.iter().enumerate() {
                    let cj = c.wrapping_add(j * ldc + 8 * half);
                    let v = if add {
                        _mm256_fmadd_ps(*acc_half, va, _mm256_loadu_ps(cj))
                    } else {
                        _mm256_mul_ps(*acc_half, va)
                    };
                    _mm256_storeu_ps(cj, v);
                }
            }
        } else {
            let mut spill = [0f32; MR * NR];
            for (j, acc_j) in acc.iter().enumerate() {
                _mm256_storeu_ps(spill.as_mut_ptr().wrapping_add(j * MR), acc_j[0]);
                _mm256_storeu_ps(spill.as_mut_ptr().wrapping_add(j * MR + 8), acc_j[1]);
            }
            for j in 0..cols {
                for i in 0..rows {
                    let (cij, v) = (c.wrapping_add(i + j * ldc), t.alpha * spill[j * MR + i]);
                    *cij = if add { *cij + v } else { v };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn random(rows: usize, cols: usize, seed: u64) -> Mat<f32> {
        let mut rng = SplitMix64::new(seed);
        Mat::from_fn(rows, cols, |_, _| rng.normal() as f32)
    }

    fn naive(a: MatRef<'_, f32>, b: MatRef<'_, f32>) -> Mat<f64> {
        Mat::from_fn(a.nrows(), b.ncols(), |i, j| {
            (0..a.ncols())
                .map(|k| a[(i, k)] as f64 * b[(k, j)] as f64)
                .sum()
        })
    }

    fn max_rel_err(got: MatRef<'_, f32>, want: &Mat<f64>, lower: bool) -> f64 {
        let scale = (0..want.ncols())
            .flat_map(|j| (0..want.nrows()).map(move |i| (i, j)))
            .map(|(i, j)| want[(i, j)].abs())
            .fold(0.0, f64::max);
        let mut worst = 0f64;
        for j in 0..want.ncols() {
            for i in 0..want.nrows() {
                if lower && i < j {
                    assert_eq!(got[(i, j)], 0.0, "upper triangle at ({i}, {j})");
                    continue;
                }
                worst = worst.max((got[(i, j)] as f64 - want[(i, j)]).abs() / scale);
            }
        }
        worst
    }

    /// Shapes with partial tiles and several K slices, operands in both layouts (the kernel packs either).
    #[test]
    fn products_match_f64_reference_in_every_layout_and_edge_shape() {
        for &(m, n, k) in &[(37, 29, 300), (64, 60, 512), (131, 97, 257), (16, 6, 2048)] {
            let (a, b) = (random(m, k, 1), random(k, n, 2));
            let want = naive(a.as_ref(), b.as_ref());
            // Row-major views of the same values: transposes of column-major copies.
            let (at, bt) = (a.transpose().to_owned(), b.transpose().to_owned());
            for (av, bv) in [
                (a.as_ref(), b.as_ref()),
                (at.as_ref().transpose(), bt.as_ref().transpose()),
            ] {
                let err = max_rel_err(product(av, bv).as_ref(), &want, false);
                assert!(err < 1e-5, "{m}x{n}x{k}: relative error {err}");
            }
        }
    }

    #[test]
    fn lower_product_fills_the_lower_triangle_and_zeroes_the_rest() {
        for &(d, n) in &[(100, 700), (203, 300)] {
            let x = random(n, d, 3);
            let xt = x.transpose().to_owned();
            let want = naive(xt.as_ref(), x.as_ref());
            let err = max_rel_err(lower_product(xt.as_ref(), x.as_ref()).as_ref(), &want, true);
            assert!(err < 1e-5, "{d}x{d} from n = {n}: relative error {err}");
        }
    }

    /// One level of Strassen's scheme (forced at small sizes) equals the f64 product: even and odd shapes (the
    /// odd last row, column and K index are added separately), both layouts, shifts on either axis, replacing
    /// and accumulating with a sign.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn strassen_products_match_f64_reference() {
        if !kernel_available() {
            return;
        }
        for &(m, n, k) in &[(64, 48, 300), (67, 53, 301), (66, 49, 300), (97, 64, 513)] {
            let (a, b) = (random(m, k, 11), random(k, n, 12));
            let (sa, sb): (Vec<f32>, Vec<f32>) = (
                (0..m).map(|i| i as f32 * 0.01).collect(),
                (0..n).map(|j| 1.0 - j as f32 * 0.02).collect(),
            );
            let ac = Mat::from_fn(m, k, |i, j| a[(i, j)] - sa[i]);
            let bc = Mat::from_fn(k, n, |i, j| b[(i, j)] - sb[j]);
            let want = naive(ac.as_ref(), bc.as_ref());
            let at = a.transpose().to_owned();
            let start = random(m, n, 13);
            for a_view in [a.as_ref(), at.as_ref().transpose()] {
                let a_op = Shifted {
                    m: a_view,
                    shift: Shift::Rows(&sa),
                };
                let b_op = Shifted::minus_row(b.as_ref(), &sb);
                let mut c = Mat::<f32>::zeros(m, n);
                // SAFETY: the kernel is available (checked above); c is column-major.
                unsafe { avx2::add_product(c.as_mut(), false, a_op, b_op, 1.0, Accum::Replace, 8) };
                let err = max_rel_err(c.as_ref(), &want, false);
                assert!(err < 1e-5, "{m}x{n}x{k}: relative error {err}");
                let mut c = start.clone();
                // SAFETY: as above.
                unsafe { avx2::add_product(c.as_mut(), false, a_op, b_op, -1.0, Accum::Add, 8) };
                let want_sub = Mat::from_fn(m, n, |i, j| start[(i, j)] as f64 - want[(i, j)]);
                let err = max_rel_err(c.as_ref(), &want_sub, false);
                assert!(err < 1e-5, "{m}x{n}x{k} accumulated: relative error {err}");
            }
        }
    }

    /// Centring while packing equals centring first, whichever axis carries the shift.
    #[test]
    fn shifted_operands_equal_centred_copies() {
        let (n, d, t) = (300, 70, 40);
        let (x, y) = (random(n, d, 6), random(n, t, 7));
        let xm: Vec<f32> = (0..d).map(|j| 3.0 + j as f32 * 0.1).collect();
        let ym: Vec<f32> = (0..t).map(|j| -2.0 + j as f32 * 0.05).collect();
        let xc = Mat::from_fn(n, d, |i, j| x[(i, j)] - xm[j]);
        let yc = Mat::from_fn(n, t, |i, j| y[(i, j)] - ym[j]);
        let xr = x.transpose().to_owned();
        let xs = Shifted::minus_row(xr.as_ref().transpose(), &xm);
        let ys = Shifted::minus_row(y.as_ref(), &ym);
        let want = naive(xc.transpose(), yc.as_ref());
        assert!(max_rel_err(product(xs.transpose(), ys).as_ref(), &want, false) < 1e-5);
        let gram = naive(xc.transpose(), xc.as_ref());
        let got = lower_product(xs.transpose(), xs);
        assert!(max_rel_err(got.as_ref(), &gram, true) < 1e-5);
        // Small shapes take faer's path with a centred copy.
        let small = product(
            xs.transpose(),
            Shifted::minus_row(y.as_ref().subcols(0, 3), &ym[..3]),
        );
        let want_small = naive(xc.transpose(), yc.as_ref().subcols(0, 3));
        assert!(max_rel_err(small.as_ref(), &want_small, false) < 1e-5);
    }
}
