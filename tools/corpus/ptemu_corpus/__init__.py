"""The corpus tools: Debian's kernel page-table writers in, ptemu's fixture corpus out.

Two commands (tools/corpus/README.md says how to run them):

* ``extract`` (``python -m tools.corpus.extract_kernel_writers``): the
  out-of-line page-table writers of Debian's kernels, as function bytes and
  the bytes the booted kernel runs, into ``src/ptemu/kvm/data/kernel_writers.json``;
* ``build`` (``python -m tools.corpus.build_corpus``): the fixture corpus in
  ``src/ptemu/corpus/``, captured with ``ptemu capture`` from those records
  and from synthetic snippets (``--from-debian`` runs the extraction first).

Modules, one purpose each, in the order the data flows:

=================  ===============================================================
``debian``         pick, download and unpack a flavour's packages (apt, dpkg-deb)
``vmlinuz``        bzImage -> the ELF vmlinux that boots
``symbols``        System.map (the ELF side is `ptemu.capture.elf.ElfImage`)
``candidates``     the functions looked for; where their arguments are
``insn``           Capstone helpers
``patching``       boot-time patch sites and the runtime bytes of a function
``listing``        a function's disassembly, classified
``writers``        one JSON record per function and flavour
``extract``        the extraction command
``entries``        realistic entry values, seeds, address-space constants
``guest``          one capture description, grown call by call
``synthetic64``    snippet traces of 64-bit (and compatibility-mode) code
``synthetic32``    snippet traces of 32/16-bit code under PAE and legacy paging
``handwritten``    refusals a capture cannot record
``own_hierarchy``  traces that edit the hierarchy their CR3 roots (``ptemu monitor``)
``kernel_args``    kernel-writer arguments in registers and stack words
``kernel_traces``  kernel-writer traces: scenarios, stubs, kernel globals
``corpus``         render, compare and write the corpus files
``build``          the build command
=================  ===============================================================

The tools are not part of the installed ``ptemu``: they need the source tree
(and, for the extraction, a Debian host). They import ``ptemu`` from ``src/``.
"""
