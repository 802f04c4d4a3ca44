# What the kernel emulators share: bf16 rounding and mma.sync m16n8k16 with the fragment layouts
# the PTX ISA defines (lane = 4 * group + thread-in-group; A 16x16 row-major in a[4][lane][2],
# B 16x8 in b0, b1[lane][2], C 16x8 in c[lane][4]). Each emulator models its own shared-memory
# addressing, which differs between kernels; ldmatrix_x4 reads it as the PTX ISA lays the
# matrices out.
import numpy as np


def bf(x):  # round to bf16 (nearest, ties to even)
    a = np.asarray(x, dtype=np.float32).copy()
    u = a.view(np.uint32)
    u[...] = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return a


def mma(c, a, b0, b1):
    # c[lane][4] += A · B
    A = np.zeros((16, 16))
    B = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for e in range(2):
            A[g, 2 * t + e] = a[0][lane][e]; A[g + 8, 2 * t + e] = a[1][lane][e]
            A[g, 2 * t + 8 + e] = a[2][lane][e]; A[g + 8, 2 * t + 8 + e] = a[3][lane][e]
            B[2 * t + e, g] = b0[lane][e]; B[2 * t + 8 + e, g] = b1[lane][e]
    C = A @ B
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for e in range(2):
            c[lane][e] += C[g, 2 * t + e]; c[lane][2 + e] += C[g + 8, 2 * t + e]


def ldmatrix_x4(smem, addr, trans=False):
    # addr[lane] = (row, col) of the row this lane addresses; returns r[4][lane] = (lo, hi)
    r = np.zeros((4, 32, 2), np.float32)
    for i in range(4):
        rows = [smem[addr[8*i+j][0], addr[8*i+j][1]:addr[8*i+j][1]+8] for j in range(8)]
        M = np.stack(rows)  # 8x8
        for lane in range(32):
            g, t = lane // 4, lane % 4
            if not trans: r[i, lane] = M[g, 2*t:2*t+2]
            else: r[i, lane] = [M[2*t, g], M[2*t+1, g]]
    return r
