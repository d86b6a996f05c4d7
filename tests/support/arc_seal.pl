#!/usr/bin/perl
# ARC-seals the message on standard input with Perl's Mail::DKIM::ARC::Signer (Debian:
# libmail-dkim-perl) and prints it, the new ARC set first, with CRLF line ends: an
# implementation independent of the dkimpy that mailsrv verifies with.
#
#   arc_seal.pl DOMAIN SELECTOR KEYFILE SRVID [CHAIN]
#
# KEYFILE is a PEM RSA private key; the message must hold an Authentication-Results: field
# of authserv-id SRVID (copied into the ARC-Authentication-Results:); CHAIN is the cv= to
# seal with: none (the first hop, the default), pass, fail, or "ar" (read from the field).
# Exits 1 when the signer did not seal (its detail on standard error).
use strict;
use warnings;
use Mail::DKIM::ARC::Signer;
use Mail::DKIM::TextWrap;

my ($domain, $selector, $keyfile, $srvid, $chain) = @ARGV;
die "usage: $0 DOMAIN SELECTOR KEYFILE SRVID [CHAIN]\n" unless defined $srvid;
my $signer = Mail::DKIM::ARC::Signer->new(
    Algorithm => 'rsa-sha256',
    Chain     => $chain // 'none',
    Domain    => $domain,
    SrvId     => $srvid,
    Selector  => $selector,
    KeyFile   => $keyfile,
    Headers   => 'from:to:subject:date:message-id',
);
binmode STDIN;
my @lines;
while (my $line = <STDIN>) {
    $line =~ s/\r?\n\z/\r\n/;
    push @lines, $line;
    $signer->PRINT($line);
}
$signer->CLOSE;
if ($signer->result ne 'sealed') {
    print STDERR "not sealed: ", $signer->result, " ", ($signer->result_detail // ''), "\n";
    exit 1;
}
binmode STDOUT;
print $signer->as_string;
print @lines;
