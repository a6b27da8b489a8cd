"""The README's handler example: a 32-bit PAE guest writes one PTE in two halves."""

from ptemu.handler import PtWriteHandler, WriteEvent
from ptemu.memory import InMemoryGuestMemory
from ptemu.vcpu import Vcpu

memory = InMemoryGuestMemory([(0x1234FF0, (0x8000000011111063).to_bytes(8, "little"))])
handler = PtWriteHandler(memory, "pae")      # one handler per guest; policy "strict"
vcpu = Vcpu()

vcpu.begin_exit()                            # a new EPT write violation
result = handler.handle_ept_write(vcpu, WriteEvent(
    gpa=0x1234FF4, gla=0xC1234FF4,          # the high half is written first
    regs={"rip": 0xC1001000, "rax": 0xC1234FF0, "rcx": 0x80000000, "rdx": 0x2222067},
    code=bytes.fromhex("89 48 04 89 10 c3"),  # mov [eax+4], ecx ; mov [eax], edx ; ret
    code_bits=32))

print(result.status, result.instructions, "instructions")
for write in result.writes:
    print(f"  wrote {write.size} bytes at {write.gpa:#x}+{write.offset}: {write.value:#x}")
for entry in result.entries:
    print(f"  entry {entry.gpa:#x} {entry.state}: {entry.old:#x} -> {entry.new:#x}",
          entry.change.describe())
print("  registers:", {name: hex(value) for name, value in result.regs.items()})
# The vCPU's PtEmuBuffer is the seed's: `new` is only the chunk the faulting
# (first) instruction wrote, so it stays partial although the entry is complete.
buffer = vcpu.pt_emu_buffer
print(f"  PtEmuBuffer: old={buffer.old:#x} new={buffer.new:#x} partial={buffer.partial} "
      "(the first instruction's 4-byte chunk only, as in the seed)")
